"""What the RGB few-shot benchmarks share (miniImageNet, tieredImageNet, CIFAR-FS, FC100): the
dataset schema, uint8 class pools, the decoded-image cache, a safe reader of the community's
pickles, and the task sources.

A split is a :class:`ClassPool`: its class names and a uint8 ``(C, M, S, S, 3)`` tensor of
``M`` images per class, channels last as decoded. :class:`~metarun.data.fewshot.FewShotTasks`
converts only the images of each sampled task to normalised float, so 60,000 84x84 images take
1.3 GB instead of the 5 GB of float32.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from metarun.data.fewshot import FewShotTasks
from metarun.data.pickles import load_numpy_pickle
from metarun.spec.bases import DatasetSchema
from metarun.spec.checks import require, require_image_model, require_optional_count
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_CACHE_FORMAT = 1  # bump when the cached representation changes

#: What the datasets' ``transform`` takes: a PIL image, an image file's path or bytes, or a uint8
#: array (numpy or torch) of shape ``(H, W)`` (grey) or ``(H, W, channels)``.
ImageLike: TypeAlias = Image.Image | str | os.PathLike | bytes | np.ndarray | Tensor


def open_image(image: ImageLike) -> Image.Image:
    """``image`` as a PIL image (a file is read at once, so nothing stays open).

    Raises:
        TypeError: a float or other non-uint8 array (already preprocessed inputs go to the
            model as tensors, not through a transform), or another type.
        ValueError: bytes or a file that is not an image.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).expanduser().read_bytes()
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return opened
        except OSError as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"not an image file ({type(error).__name__}: {error})") from None
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(
                f"an image array must be uint8 (H, W) or (H, W, channels), got {image.dtype} "
                f"{image.shape} (float inputs already preprocessed are passed as tensors, "
                "without a transform)"
            )
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise TypeError(
        f"an image must be a PIL image, a path, bytes of an image file or a uint8 array, got "
        f"{type(image).__name__}"
    )


def decode_image(image: Image.Image, image_size: int, channels: int = 3) -> Image.Image:
    """An image file's pixels as the file-based loaders decode them: RGB (``channels=3``:
    miniImageNet's and tieredImageNet's image folders and pickles of PNGs) or 8-bit grey
    (``channels=1``: Omniglot), resized with LANCZOS (antialiased) to ``image_size`` when it
    differs."""
    converted = image.convert("RGB" if channels == 3 else "L")
    if converted.size != (image_size, image_size):
        converted = converted.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return converted


def decode_bytes(data: bytes, image_size: int, where: str) -> bytes:
    """An image file's bytes -> ``image_size**2 * 3`` bytes of RGB (:func:`decode_image`).

    Raises:
        ValueError: not an image Pillow reads, naming ``where`` (the file, or the archive).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return decode_image(image, image_size).tobytes()
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(
            f"cannot decode an image of {where} ({type(error).__name__}: {error}). Fix: "
            f"replace the file with a complete copy"
        ) from None


def decode_rgb(image: Image.Image, image_size: int) -> Image.Image:
    """:func:`decode_image` in RGB."""
    return decode_image(image, image_size, 3)


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(..., H, W, ch)`` -> float32 ``(..., ch, H, W)``: in ``[0, 1]``, then minus the
    per-channel ``mean`` over ``std``: what :class:`~metarun.data.fewshot.FewShotTasks` gives a
    task's images (without augmentation), bit for bit."""
    x = images.movedim(-1, -3).float().div_(255.0)
    channels = x.shape[-3]
    return x.sub_(torch.tensor([float(m) for m in mean]).view(channels, 1, 1)).div_(
        torch.tensor([float(s) for s in std]).view(channels, 1, 1)
    )


@dataclass(frozen=True)
class ClassPool:
    """One split: ``names[i]`` is the class of ``images[i]``, ``(C, M, S, S, 3)`` uint8.

    Classes with different numbers of images (tieredImageNet) are stored flat instead:
    ``images`` ``(N, S, S, 3)``, class ``i`` in rows ``offsets[i]:offsets[i + 1]``.
    """

    names: tuple[str, ...]
    images: Tensor
    offsets: Tensor | None = None

    def __post_init__(self) -> None:
        if self.offsets is not None:
            if self.images.dtype != torch.uint8 or self.images.dim() != 4:
                raise ValueError(
                    f"a ragged class pool must be uint8 (N, S, S, 3), got {self.images.dtype} "
                    f"{tuple(self.images.shape)}"
                )
            if len(self.offsets) != len(self.names) + 1:
                raise ValueError(
                    f"{len(self.names)} class names for {len(self.offsets) - 1} classes"
                )
            return
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(
                f"a class pool must be uint8 (C, M, S, S, 3), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.names) != self.images.shape[0]:
            raise ValueError(
                f"{len(self.names)} class names for {self.images.shape[0]} classes of images"
            )

    def __len__(self) -> int:
        return len(self.names)


def fingerprint(paths: Sequence[Path]) -> str:
    """Names, sizes and mtimes: changes whenever one of the files does."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def resize_images(images: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, size, size, 3)`` uint8 (antialiased bilinear), in chunks
    so that only ``chunk`` images are ever held in float."""
    if images.shape[1] == images.shape[2] == size:
        return images
    out = torch.empty((images.shape[0], size, size, images.shape[3]), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].permute(0, 3, 1, 2).float()  # (n, 3, H, W)
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True)
        out[start : start + chunk] = (
            part.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        )
    return out


# --------------------------------------------------------------------------- pickles


def load_pickle(path: Path, fix: str) -> Any:
    """Unpickle ``path`` with :class:`~metarun.data.pickles.NumpyUnpickler` (Python 2 pickles
    too).

    Raises:
        ValueError: the file is damaged or holds something else, naming it and ``fix``.
    """
    try:
        with open(path, "rb") as handle:
            return load_numpy_pickle(handle)
    except Exception as error:  # corrupt bytes raise anything from EOFError to IndexError
        raise ValueError(
            f"cannot read {path} ({type(error).__name__}: {error}). Fix: {fix}"
        ) from error


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metarun"


def cached_pools(
    dataset: str,
    key: str,
    cache_dir: str | Path | None,
    decode: Callable[[], dict[str, ClassPool]],
    splits: Sequence[str] = SPLITS,
) -> dict[str, ClassPool]:
    """The decoded pools of ``dataset`` from the cache file keyed by ``key`` (the sources'
    fingerprints and the decoding settings), or ``decode()`` then written there.

    ``splits`` names the pools ``decode`` returns: the three splits, or one pool of every class
    where the split is drawn after loading (Omniglot: another seed needs no new decode).

    A cache that cannot be read or written only costs a decode (logged): data folders are often
    shared or read-only.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha1(f"v{_CACHE_FORMAT}|{key}".encode(), usedforsecurity=False).hexdigest()[
        :16
    ]
    path = folder / f"{dataset}_{digest}.pt"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            pools = {
                split: ClassPool(
                    tuple(str(n) for n in state[split]["names"]),
                    state[split]["images"],
                    state[split].get("offsets"),
                )
                for split in splits
            }
        except Exception as error:  # a corrupt cache only costs a re-decode
            logger.warning(
                "ignoring unreadable %s cache %s (%s); decoding again", dataset, path, error
            )
        else:
            logger.info("loaded decoded %s from %s", dataset, path)
            return pools
    pools = decode()
    _save(
        dataset,
        path,
        {
            s: {"names": list(p.names), "images": p.images, "offsets": p.offsets}
            for s, p in pools.items()
        },
    )
    return pools


def _save(dataset: str, path: Path, state: dict[str, Any]) -> None:
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as tmp:
            tmp_path = Path(tmp.name)
            torch.save(state, tmp)
        os.chmod(tmp_path, 0o644)  # NamedTemporaryFile makes it 0600
        os.replace(tmp_path, path)
        tmp_path = None
        logger.info("cached decoded images in %s", path)
    except OSError as error:
        logger.warning(
            "could not write the %s cache %s (%s); set dataset.cache_dir to a writable folder "
            "to avoid decoding on every run",
            dataset,
            path,
            error,
        )
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def stack_classes(
    images: Tensor, labels: Sequence[int], classes: Sequence[int], where: str
) -> Tensor:
    """Group ``images (N, ...)`` by label: ``(len(classes), M, ...)``, in file order within a
    class.

    Raises:
        ValueError: the classes do not all have the same number of images (naming ``where``).
    """
    label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
    rows = [(label_tensor == c).nonzero().squeeze(1) for c in classes]
    counts = sorted({len(r) for r in rows})
    if len(counts) != 1 or counts[0] == 0:
        raise ValueError(
            f"{where}: every class needs the same, non-zero number of images, found counts "
            f"{counts}. Fix: replace the files with complete ones"
        )
    return images[torch.stack(rows)]


# --------------------------------------------------------------------------- schema, tasks


@dataclass
class FewShotConfig(DatasetSchema):
    """Keys every few-shot image dataset shares: where the files are, the image size, the cache,
    and the task shape (ways, shots, queries; the evaluation's own)."""

    root: str = "data"
    image_size: int = 84
    cache_dir: str | None = None
    n_way: int = 5
    k_shot: int = 1
    # 15 query examples per class during meta-training, as in the MAML reference code.
    k_query: int = 15
    eval_k_shot: int | None = None
    eval_k_query: int | None = None
    # Classes per validation/test task; null = n_way. Metric-based learners train with more
    # ways than they test with (Snell et al. 2017: 60-way training, 5- and 20-way test).
    eval_n_way: int | None = None

    models: ClassVar[tuple[str, ...]] = ("conv4", "resnet12")
    #: The option name, for messages.
    option: ClassVar[str] = "images"
    #: The smallest ``dataset.image_size`` and the example its message suggests.
    min_image_size: ClassVar[int] = 8
    image_size_example: ClassVar[str] = "dataset.image_size=84"

    def ways(self) -> tuple[int, int]:
        return self.n_way, self.eval_n_way or self.n_way

    def __post_init__(self) -> None:
        require(self.n_way >= 2, "dataset.n_way", self.n_way, ">= 2", "dataset.n_way=5")
        require(
            self.eval_n_way is None or self.eval_n_way >= 2,
            "dataset.eval_n_way",
            self.eval_n_way,
            ">= 2 or null (null = dataset.n_way)",
            "dataset.eval_n_way=5",
        )
        require(self.k_shot >= 1, "dataset.k_shot", self.k_shot, ">= 1", "dataset.k_shot=1")
        require(self.k_query >= 1, "dataset.k_query", self.k_query, ">= 1", "dataset.k_query=15")
        require_optional_count("dataset.eval_k_shot", self.eval_k_shot, "dataset.eval_k_shot=1")
        require_optional_count("dataset.eval_k_query", self.eval_k_query, "dataset.eval_k_query=15")
        require(
            self.image_size >= self.min_image_size,
            "dataset.image_size",
            self.image_size,
            f">= {self.min_image_size}",
            self.image_size_example,
        )

    def normalisation(self) -> tuple[list[float] | None, list[float] | None, int]:
        """``(mean, std, augment_padding)`` of the tasks' images: none by default (the pools
        are used as decoded, in ``[0, 1]``)."""
        return None, None, 0


@dataclass
class FewShotImageConfig(FewShotConfig):
    """Keys shared by the RGB few-shot image datasets (each subclass sets its defaults)."""

    # Random crop (zero padding of augment_padding pixels) + horizontal flip of training tasks'
    # images, as the MetaOptNet and ProtoNets pipelines; off for the MAML presets (Finn et al.
    # 2017 use none).
    augment: bool = False
    augment_padding: int = 8
    # Per-channel statistics of the images in [0, 1] (subclasses: the dataset's own).
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])

    def image_channels(self) -> int:
        """Colour channels of the images the model sees."""
        return 3

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.augment_padding >= 0,
            "dataset.augment_padding",
            self.augment_padding,
            ">= 0",
            "dataset.augment_padding=8",
        )
        channels = self.image_channels()
        names = "(R, G, B)" if channels == 3 else f"(one per channel: dataset.channels={channels})"
        for key, values, example in (
            ("dataset.mean", self.mean, "dataset.mean=[0.47,0.45,0.41]"),
            ("dataset.std", self.std, "dataset.std=[0.28,0.27,0.28]"),
        ):
            if channels != 3:
                example = f"{key}=[{0.0 if key == 'dataset.mean' else 1.0}]"
            require(
                len(values) == channels, key, list(values), f"{channels} values {names}", example
            )
        require(
            all(s > 0 for s in self.std),
            "dataset.std",
            list(self.std),
            "positive",
            "dataset.std=[0.28,0.27,0.28]",
        )

    def normalisation(self) -> tuple[list[float] | None, list[float] | None, int]:
        return list(self.mean), list(self.std), self.augment_padding if self.augment else 0

    def check_model(self, model: Any) -> None:
        channels = self.image_channels()
        require_image_model(
            model,
            n_way=self.n_way,
            image_size=self.image_size,
            channels=channels,
            colours=(
                f"3 for dataset={self.option} (RGB)"
                if channels == 3
                else f"{channels} for dataset={self.option} with dataset.channels={channels}"
            ),
        )

    def transform(self, image: ImageLike) -> Tensor:
        """One raw image -> the model's input ``(3, image_size, image_size)``, as this dataset's
        tasks give it: a PIL image, file or image bytes decoded as the image-file loaders do
        (RGB, LANCZOS to ``image_size``), a uint8 ``(H, W, 3)`` array as the array loaders do
        (antialiased bilinear, :func:`resize_images`), then :func:`normalise` with
        ``dataset.mean`` / ``dataset.std``."""
        if isinstance(image, (np.ndarray, Tensor)):
            pixels = torch.from_numpy(np.array(open_image(image).convert("RGB")))
            pixels = resize_images(pixels[None], self.image_size)[0]
        else:
            pixels = torch.from_numpy(np.array(decode_rgb(open_image(image), self.image_size)))
        return normalise(pixels, self.mean, self.std)


def _per_class(pool: ClassPool | Tensor) -> str:
    if isinstance(pool, Tensor) or pool.offsets is None:
        images = pool if isinstance(pool, Tensor) else pool.images
        return str(int(images.shape[1]))
    counts = pool.offsets.diff()
    return f"{int(counts.min())}-{int(counts.max())}"


def image_task_sources(
    config: FewShotConfig, pools: Mapping[str, ClassPool | Tensor]
) -> TaskSources:
    """Training tasks (normalised and augmented as ``config.normalisation()`` says) and
    fixed-seed val/test sources, from :class:`ClassPool` s or float ``(C, M, *input_shape)``
    pools."""
    logger.info(
        "%s: %s classes (train/val/test), %s images per class, %dpx",
        config.option,
        "/".join(str(len(pools[s])) for s in SPLITS),
        "/".join(_per_class(pools[s]) for s in SPLITS),
        config.image_size,
    )
    n, eval_n = config.ways()
    shot, query = config.k_shot, config.k_query
    eval_shot, eval_query = config.eval_k_shot or shot, config.eval_k_query or query
    mean, std, padding = config.normalisation()

    def tasks(split: str, ways: int, shots: int, queries: int, augment: int = 0) -> FewShotTasks:
        pool = pools[split]
        if isinstance(pool, Tensor):
            return FewShotTasks(pool, ways, shots, queries, augment_padding=augment)
        return FewShotTasks(
            pool.images,
            ways,
            shots,
            queries,
            mean=mean,
            std=std,
            augment_padding=augment,
            offsets=pool.offsets,
        )

    return TaskSources(
        train=tasks("train", n, shot, query, padding),
        val=tasks("val", eval_n, eval_shot, eval_query),
        test=tasks("test", eval_n, eval_shot, eval_query),
    )
