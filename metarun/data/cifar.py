"""Noisy-label CIFAR-10/100 (Ren et al. 2018, Sec. 5.2) from the official pickled batches.

The official "python version" archives extract to::

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta

each batch a pickled dict with ``data`` (uint8 ``(N, 3072)``, channel-major 32x32 RGB) and
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). They are looked for in ``<root>``,
``<root>/cifar10`` (``cifar100``) and ``<root>/cifar``.

The pickles on disk are read here, not through ``torchvision.datasets.CIFAR10``: torchvision
re-hashes every file (MD5) on each construction and would reject anything but the official
bytes. Instead the files are unpickled with an allow-list that admits only what the official
batches contain (numpy arrays and plain containers), so a tampered pickle cannot run code, and
their contents are checked (shapes, label ranges). Downloads (``download=True``) go through
torchvision's downloader and are MD5-checked.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from metarun.data.download import downloaded, find_under, not_found_message, replace_into
from metarun.data.pickles import load_numpy_pickle, text
from metarun.data.supervised import (
    SplitData,
    random_crop_flip,
    reweighting_sources,
)
from metarun.registry import register
from metarun.spec.bases import SUPERVISED, DatasetSchema
from metarun.spec.checks import require
from metarun.spec.enums import NoiseType
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskSources

__all__ = ["background_flip", "check_cifar_batches", "load_cifar_noisy", "uniform_flip"]

logger = logging.getLogger(__name__)

NOISE_TYPES = ("uniform", "background")
_LAYOUT: dict[int, dict[str, Any]] = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": "labels",
        "meta": "batches.meta",
        "subdirs": ("", "cifar10", "cifar"),
        "dataset": "CIFAR10",  # torchvision.datasets class holding url, filename and MD5
        "archive": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels": "fine_labels",
        "meta": "meta",
        "subdirs": ("", "cifar100", "cifar"),
        "dataset": "CIFAR100",
        "archive": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    },
}
_SIDE = 32
FILES_100 = ("train", "test")


# --------------------------------------------------------------------------- label noise


def _check_noise(labels: Tensor, num_classes: int, noise: float) -> int:
    """Validate and return how many labels are touched: ``round(noise * N)``."""
    if num_classes < 2:
        raise ValueError(f"label noise needs num_classes >= 2, got {num_classes}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(
            f"dataset.noise must be in [0, 1] (the fraction of training labels flipped), got "
            f"{noise} (set e.g. dataset.noise=0.4)"
        )
    if labels.dim() != 1 or labels.dtype != torch.long:
        raise TypeError(
            f"labels must be a 1-d int64 tensor, got shape {tuple(labels.shape)} {labels.dtype}"
        )
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return round(noise * len(labels))


def uniform_flip(
    labels: Tensor,
    num_classes: int,
    noise: float,
    generator: torch.Generator,
    *,
    exclude_true: bool = True,
) -> Tensor:
    """UniformFlip (Ren et al. 2018, Sec. 5.2): "all label classes can uniformly flip to any
    other label classes".

    Exactly ``round(noise * N)`` examples, chosen uniformly without replacement, get a label
    drawn uniformly from the ``num_classes - 1`` other classes; so exactly that many labels are
    wrong and the noise transition matrix is ``1 - noise`` on the diagonal and
    ``noise / (num_classes - 1)`` elsewhere.

    The official code (``cifar/generate_noisy_cifar_data.py``, "Not garanteeing flip")
    instead redraws the chosen labels from ``floor(uniform(0, C - 1))``, which can return the
    true label and never returns class ``C - 1``; ``exclude_true=False`` redraws from all
    ``num_classes`` classes (about ``noise * (1 - 1/C)`` of the labels then end up wrong).

    Args:
        labels: ``(N,)`` int64 true labels in ``[0, num_classes)``; not modified.
        num_classes: number of classes.
        noise: fraction of the examples relabelled, in ``[0, 1]``.
        generator: the only source of randomness.
        exclude_true: draw the new label from the other classes only.

    Returns:
        ``(N,)`` int64 noisy labels.

    Raises:
        ValueError: ``noise`` outside ``[0, 1]``, fewer than 2 classes, labels out of range.
        TypeError: labels not a 1-d int64 tensor.
    """
    k = _check_noise(labels, num_classes, noise)
    chosen = torch.randperm(len(labels), generator=generator)[:k]
    noisy = labels.clone()
    if exclude_true:
        # A shift by 1..C-1 (mod C) is uniform over the other classes.
        shift = torch.randint(1, num_classes, (k,), generator=generator)
        noisy[chosen] = (labels[chosen] + shift) % num_classes
    else:
        noisy[chosen] = torch.randint(0, num_classes, (k,), generator=generator)
    return noisy


def background_flip(
    labels: Tensor,
    num_classes: int,
    noise: float,
    generator: torch.Generator,
    background: int | None = None,
) -> Tensor:
    """BackgroundFlip (Ren et al. 2018, Sec. 5.2): "all label classes can flip to a single
    background class", as when annotators miss positives that then stay in the background.

    As in the official code (``_flip_data_background``): exactly ``round(noise * N)`` examples,
    chosen uniformly without replacement from all of them, get the label ``background``; those
    already of that class keep a correct label, so about ``noise * (1 - 1/C)`` of the labels of a
    balanced set end up wrong, and the background class is then the most frequent one.

    Args:
        labels: ``(N,)`` int64 true labels in ``[0, num_classes)``; not modified.
        num_classes: number of classes.
        noise: fraction of the examples relabelled, in ``[0, 1]``.
        generator: the only source of randomness.
        background: the background class; ``None``: one class drawn uniformly with
            ``generator`` (the official code draws it at random too, from the first ``C - 1``).

    Returns:
        ``(N,)`` int64 noisy labels.

    Raises:
        ValueError: ``noise`` outside ``[0, 1]``, fewer than 2 classes, labels or
            ``background`` out of range.
        TypeError: labels not a 1-d int64 tensor.
    """
    k = _check_noise(labels, num_classes, noise)
    if background is None:
        background = int(torch.randint(0, num_classes, (1,), generator=generator))
    if not 0 <= background < num_classes:
        raise ValueError(
            f"dataset.background must be a class in [0, {num_classes}), got {background}"
        )
    chosen = torch.randperm(len(labels), generator=generator)[:k]
    noisy = labels.clone()
    noisy[chosen] = background
    return noisy


# --------------------------------------------------------------------------- files


def _unpickle(path: Path) -> Any:
    try:
        # latin1: the official files were pickled by Python 2 (keys and names are byte strings).
        return load_numpy_pickle(io.BytesIO(path.read_bytes()))
    except Exception as error:  # corrupt bytes raise anything from EOFError to IndexError
        raise ValueError(
            f"cannot read the CIFAR batch {path} ({type(error).__name__}: {error}). Fix: delete "
            f"its folder and set dataset.download=true, or replace it with the official file"
        ) from error


def read_batch(path: Path, label_keys: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """One pickled batch -> ``images (N, 3, 32, 32)`` uint8 and one ``(N,)`` int64 tensor per
    name in ``label_keys`` (``labels``; ``fine_labels``, ``coarse_labels``).

    Raises:
        ValueError: the file is damaged or not in the official format, naming it and the fix.
    """
    fix = "Fix: replace it with the official file"
    entry = _unpickle(path)
    try:
        entry = {text(k): v for k, v in entry.items()}
        images = torch.as_tensor(entry["data"])
        labels = [torch.as_tensor(entry[key], dtype=torch.long) for key in label_keys]
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: expected a dict with data and {', '.join(label_keys)} "
            f"({type(error).__name__}: {error}). {fix}"
        ) from None
    if images.dtype != torch.uint8 or images.dim() != 2 or images.shape[1] != 3 * _SIDE * _SIDE:
        raise ValueError(
            f"{path}: 'data' must be uint8 of shape (N, {3 * _SIDE * _SIDE}), got "
            f"{images.dtype} {tuple(images.shape)}. {fix}"
        )
    for key, targets in zip(label_keys, labels, strict=True):
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"{path}: {images.shape[0]} images but {tuple(targets.shape)} {key!r}. {fix}"
            )
    return images.reshape(-1, 3, _SIDE, _SIDE), labels


def cifar_folder(
    root: Path, num_classes: int, *, download: bool = False, meta: bool = False, option: str = ""
) -> Path:
    """The ``cifar-10-batches-py/`` or ``cifar-100-python/`` folder under ``root`` (or its
    ``cifar10``/``cifar100``/``cifar`` subfolder), downloaded first when missing and
    ``download``; ``meta``: the label names' file is needed too.

    Raises:
        FileNotFoundError: not there and ``download=False``; the message names every folder
            looked in and the fix (``option`` names the dataset option it is for).
        DownloadError: ``download=True`` but the download failed.
    """
    layout = _LAYOUT[num_classes]
    names = layout["train"] + layout["test"] + ([layout["meta"]] if meta else [])

    def present(folder: Path) -> bool:
        return all((folder / layout["folder"] / name).is_file() for name in names)

    found = find_under(root, layout["subdirs"], present)
    if found is None and download:
        _download(root, num_classes)
        found = find_under(root, layout["subdirs"], present)
    if found is None:
        filename, md5 = layout["archive"]
        raise FileNotFoundError(
            not_found_message(
                f"CIFAR-{num_classes}" + (f" (for dataset={option})" if option else ""),
                root,
                layout["subdirs"],
                f"{layout['folder']}/ holding {', '.join(names)}",
                f"set dataset.root=<folder holding {layout['folder']}/>, or set "
                f"dataset.download=true on a machine with network (the official {filename}, "
                f"MD5 {md5})",
            )
        )
    return found / layout["folder"]


def read_cifar100(folder: Path) -> tuple[Tensor, Tensor, Tensor, list[str], list[str]]:
    """The 60,000 images of ``cifar-100-python/`` (train then test), channels last.

    Returns:
        ``images (N, 32, 32, 3)`` uint8, ``fine (N,)`` and ``coarse (N,)`` int64 labels, the
        fine and the coarse label names.

    Raises:
        ValueError: a file is damaged or not in the official format.
    """
    meta = _unpickle(folder / "meta")
    try:
        meta = {text(k): v for k, v in meta.items()}
        fine_names = [text(n) for n in meta["fine_label_names"]]
        coarse_names = [text(n) for n in meta["coarse_label_names"]]
    except (AttributeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{folder / 'meta'}: expected a dict with fine_label_names and coarse_label_names "
            f"({type(error).__name__}: {error}). Fix: delete {folder} and set "
            "dataset.download=true, or replace it with the official files"
        ) from None
    parts = [read_batch(folder / name, ("fine_labels", "coarse_labels")) for name in FILES_100]
    # (N, 3, 32, 32) channel-major rows -> channels last, as the other image pools.
    images = torch.cat([p[0] for p in parts]).permute(0, 2, 3, 1).contiguous()
    fine = torch.cat([p[1][0] for p in parts])
    coarse = torch.cat([p[1][1] for p in parts])
    return images, fine, coarse, fine_names, coarse_names


def _download(root: Path, num_classes: int) -> None:
    """Fetch the official archive (MD5-checked) and extract it into ``<root>/<folder>/``, file by
    file."""
    # Imported here: torchvision.datasets takes about a second to import.
    import torchvision.datasets
    from torchvision.datasets.utils import extract_archive

    layout = _LAYOUT[num_classes]
    dataset = getattr(torchvision.datasets, layout["dataset"])
    dest = root / layout["folder"]
    fix = (
        f"extract the official {dataset.filename} (MD5 {dataset.tgz_md5}) into {root} yourself, "
        f"so that {dest} holds {', '.join(layout['train'] + layout['test'])}"
    )
    with downloaded(dataset.url, dataset.filename, dataset.tgz_md5, into=root, fix=fix) as archive:
        extract_archive(str(archive), str(archive.parent))
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted((archive.parent / layout["folder"]).iterdir()):
            replace_into(path, dest / path.name)


def _read_split(folder: Path, num_classes: int, split: str) -> tuple[Tensor, Tensor]:
    layout = _LAYOUT[num_classes]
    parts = [read_batch(folder / name, [layout["labels"]]) for name in layout[split]]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1][0] for p in parts])
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(
            f"{folder}: {split} labels span [{int(labels.min())}, {int(labels.max())}], not "
            f"[0, {num_classes}): is this CIFAR-{num_classes}? Fix: set dataset.num_classes to "
            f"match the files"
        )
    return images, labels


def _clean_split(
    labels: Tensor, n_clean: int, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Class-balanced clean indices (``n_clean // C`` per class, the remainder to random
    classes) and the rest, both sorted."""
    order = torch.randperm(len(labels), generator=generator)
    quota = torch.full((num_classes,), n_clean // num_classes, dtype=torch.long)
    quota[torch.randperm(num_classes, generator=generator)[: n_clean % num_classes]] += 1
    have = torch.bincount(labels, minlength=num_classes)
    short = (have < quota).nonzero().squeeze(1).tolist()
    if short:
        raise ValueError(
            f"dataset.n_clean={n_clean} takes {quota[short[0]]} clean images of class "
            f"{short[0]} but the training set has only {have[short[0]]} (classes short: "
            f"{short}). Fix: lower dataset.n_clean"
        )
    shuffled = labels[order]
    # Rank of each shuffled example among those of its class: take the first quota[c].
    rank = torch.empty_like(order)
    for c in range(num_classes):
        mask = shuffled == c
        rank[mask] = torch.arange(int(mask.sum()))
    is_clean = torch.zeros(len(labels), dtype=torch.bool)
    is_clean[order[rank < quota[shuffled]]] = True
    return is_clean.nonzero().squeeze(1), (~is_clean).nonzero().squeeze(1)


def _to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0)  # (N, 3, 32, 32) in [0, 1]


def load_cifar_noisy(
    root: str | Path,
    *,
    num_classes: int = 10,
    noise: float = 0.4,
    noise_type: str = "uniform",
    n_clean: int = 1000,
    seed: int = 0,
    download: bool = False,
    background: int | None = None,
) -> SplitData:
    """CIFAR-10/100 with synthetic label noise on the training set and a small clean set.

    Following Ren et al. (2018, Sec. 5.2): ``n_clean`` training images (1,000 in the paper) are
    set aside with their true labels as the clean validation set, then label noise is applied
    to the rest: :func:`uniform_flip` or :func:`background_flip` at rate ``noise`` (40% in the
    paper). The test set is the official one, clean. Randomness comes from one
    ``torch.Generator().manual_seed(seed)``, used in this order: clean split, (background
    class), noise.

    Difference from the official code, which takes a random (not class-balanced) clean set: the
    clean set here is class-balanced, ``n_clean // C`` images per class, the remaining
    ``n_clean % C`` one each to randomly chosen classes. Both pools keep the files' order.

    Args:
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (see the
            module docstring for where).
        num_classes: 10 (CIFAR-10) or 100 (CIFAR-100, fine labels).
        noise: fraction of the remaining training examples relabelled, in ``[0, 1]``.
        noise_type: ``"uniform"`` (to a different class, uniformly) or ``"background"`` (to
            one background class).
        n_clean: size of the clean validation set taken out of the training set.
        seed: seed of the clean split and the noise.
        download: fetch and extract the official archive into ``root`` when the files are
            missing (MD5-checked; fails within ``DOWNLOAD_TIMEOUT_S`` when offline).
        background: ``noise_type="background"``: the background class; ``None``: drawn with the
            seed. Ignored for uniform noise.

    Returns:
        :class:`SplitData`: ``(N, 3, 32, 32)`` float32 images in ``[0, 1]`` (no standardisation
        or augmentation); ``train_y`` noisy, ``train_y_true`` the true labels, ``val_*`` the
        clean set, ``test_*`` the official test set; ``background_class`` for background noise.

    Raises:
        FileNotFoundError: the files are missing and ``download=False``.
        DownloadError: ``download=True`` but the download failed (also a ValueError).
        ValueError: bad arguments, or a corrupt or foreign file.

    References:
        Ren, Zeng, Yang, Urtasun. Learning to Reweight Examples for Robust Deep Learning.
        ICML 2018, Sec. 5.2 and Table 1.

    Example:
        >>> data = load_cifar_noisy("data", noise=0.4, noise_type="background")
        >>> data.train_x.shape, float((data.train_y != data.train_y_true).float().mean())
        (torch.Size([49000, 3, 32, 32]), 0.36...)
    """
    if num_classes not in _LAYOUT:
        raise ValueError(
            f"dataset.num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}"
        )
    if noise_type not in NOISE_TYPES:
        raise ValueError(
            f"dataset.noise_type must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}"
        )
    if not 0.0 <= noise <= 1.0:
        raise ValueError(
            f"dataset.noise must be in [0, 1] (the fraction of training labels flipped), got "
            f"{noise} (set e.g. dataset.noise=0.4)"
        )
    if n_clean < 1:
        raise ValueError(f"dataset.n_clean must be >= 1, got {n_clean} (set e.g. 1000)")
    folder = cifar_folder(Path(root).expanduser(), num_classes, download=download)

    train_images, train_labels = _read_split(folder, num_classes, "train")
    test_images, test_labels = _read_split(folder, num_classes, "test")
    if n_clean >= len(train_labels):
        raise ValueError(
            f"dataset.n_clean={n_clean} leaves no training images: the training set in {folder} "
            f"has {len(train_labels)}. Fix: set dataset.n_clean<{len(train_labels)}"
        )

    generator = torch.Generator().manual_seed(seed)
    clean, rest = _clean_split(train_labels, n_clean, num_classes, generator)
    y_true = train_labels[rest]
    background_class = None
    if noise_type == "uniform":
        y_noisy = uniform_flip(y_true, num_classes, noise, generator)
    else:
        if background is None:
            background = int(torch.randint(0, num_classes, (1,), generator=generator))
        background_class = background
        y_noisy = background_flip(y_true, num_classes, noise, generator, background=background)
    logger.info(
        "CIFAR-%d: %d training images (%d labels flipped, %s noise %.2f), %d clean, %d test",
        num_classes,
        len(y_true),
        int((y_noisy != y_true).sum()),
        noise_type,
        noise,
        len(clean),
        len(test_labels),
    )
    return SplitData(
        train_x=_to_float(train_images[rest]),
        train_y=y_noisy,
        val_x=_to_float(train_images[clean]),
        val_y=train_labels[clean],
        test_x=_to_float(test_images),
        test_y=test_labels,
        num_classes=num_classes,
        train_y_true=y_true,
        background_class=background_class,
    )


def check_cifar_batches(config: Any, clean_set: str) -> None:
    """Checks of the batch and augmentation keys the CIFAR options share (``batch_size``,
    ``clean_batch_size``, ``crop_padding``); ``clean_set`` names the clean set's size in the
    message (``"dataset.n_clean=1000"``), its value in ``config.n_clean``."""
    require(
        config.batch_size >= 1,
        "dataset.batch_size",
        config.batch_size,
        ">= 1",
        "dataset.batch_size=100",
    )
    require(
        config.clean_batch_size is None or 1 <= config.clean_batch_size <= config.n_clean,
        "dataset.clean_batch_size",
        config.clean_batch_size,
        f"null or in [1, {clean_set}]",
        "dataset.clean_batch_size=100",
    )
    require(
        0 <= config.crop_padding <= 16,
        "dataset.crop_padding",
        config.crop_padding,
        "in [0, 16] (pixels per side)",
        "dataset.crop_padding=2",
    )


def check_option_classes(num_classes: int, classes: int, kind: str) -> None:
    """``dataset.num_classes`` is the one ``dataset=cifar<classes>_<kind>`` stands for.

    Raises:
        ConfigError: another value, naming the option that has it.
    """
    other_classes = 100 if classes == 10 else 10
    option, other = f"cifar{classes}_{kind}", f"cifar{other_classes}_{kind}"
    if num_classes != classes:
        raise ConfigError(
            f"dataset.num_classes must be {classes} for dataset={option}, got {num_classes} "
            f"(the option fixes it: leave it out, or use dataset={other} for "
            f"CIFAR-{other_classes})"
        )


def check_num_classes(model: Any, num_classes: int) -> None:
    """The classifier's outputs are the dataset's classes."""
    require(
        model.num_classes == num_classes,
        "model.num_classes",
        model.num_classes,
        f"equal to dataset.num_classes ({num_classes})",
        "model.num_classes=${dataset.num_classes}",
    )


@dataclass
class Cifar10NoisyConfig(DatasetSchema):
    """``dataset=cifar10_noisy``: CIFAR-10 with label noise on the training pool and a small
    clean set taken out of it (Ren et al. 2018, Sec. 5.2)."""

    root: str = "${oc.env:METARUN_DATA,data}"  # holds cifar-10-batches-py/ (or cifar10/...)
    num_classes: int = 10  # fixed by the option: 10 here, 100 for dataset=cifar100_noisy
    noise: float = 0.4  # fraction of training labels flipped
    noise_type: NoiseType = NoiseType.uniform
    background: int | None = None  # noise_type=background: the class; null = drawn with seed
    n_clean: int = 1000  # clean set, class-balanced, taken out of the training images
    download: bool = False
    seed: int = 0  # clean split and noise (not the training seed)
    batch_size: int = 100  # training examples per step
    # Clean examples per step (the official code's bsize_b); null = the whole clean set.
    clean_batch_size: int | None = 100
    # Random crops after zero padding, and left-right mirroring, of the training and clean
    # batches (Ren et al. 2018 pad 32 -> 36, crop 32); validation and test images never.
    augment: bool = True
    crop_padding: int = 2  # pixels per side (4 is the common ResNet setting)

    task_kind: ClassVar[str] = SUPERVISED
    models: ClassVar[tuple[str, ...]] = ("resnet32", "wrn28_10")
    _classes: ClassVar[int] = 10  # the classes this option stands for

    def __post_init__(self) -> None:
        check_option_classes(self.num_classes, self._classes, "noisy")
        require(
            0.0 <= self.noise <= 1.0, "dataset.noise", self.noise, "in [0, 1]", "dataset.noise=0.4"
        )
        require(
            self.background is None or 0 <= self.background < self.num_classes,
            "dataset.background",
            self.background,
            f"null or a class in [0, {self.num_classes})",
            "dataset.background=null",
        )
        require(self.n_clean >= 1, "dataset.n_clean", self.n_clean, ">= 1", "dataset.n_clean=1000")
        check_cifar_batches(self, f"dataset.n_clean={self.n_clean}")

    def check_model(self, model: Any) -> None:
        check_num_classes(model, self.num_classes)

    def shard_sizes(self) -> dict[str, int]:
        if self.clean_batch_size is None:  # the whole clean set each step
            return {"dataset.batch_size": self.batch_size, "dataset.n_clean": self.n_clean}
        return {
            "dataset.batch_size": self.batch_size,
            "dataset.clean_batch_size": self.clean_batch_size,
        }


@dataclass
class Cifar100NoisyConfig(Cifar10NoisyConfig):
    """``dataset=cifar100_noisy``: CIFAR-100 (fine labels), otherwise as ``cifar10_noisy``."""

    num_classes: int = 100

    _classes: ClassVar[int] = 100


def cifar_sources(config: Any, data: SplitData) -> TaskSources:
    """The training and clean batches of a CIFAR option (``batch_size``, ``clean_batch_size``,
    ``augment``, ``crop_padding``)."""
    augment = (
        functools.partial(random_crop_flip, padding=config.crop_padding) if config.augment else None
    )
    return reweighting_sources(data, config.batch_size, config.clean_batch_size, augment)


@register("dataset", "cifar100_noisy", Cifar100NoisyConfig)
@register("dataset", "cifar10_noisy", Cifar10NoisyConfig)
def build_cifar_noisy(config: Cifar10NoisyConfig) -> TaskSources:
    data = load_cifar_noisy(
        config.root,
        num_classes=config.num_classes,
        noise=config.noise,
        noise_type=config.noise_type.value,
        n_clean=config.n_clean,
        seed=config.seed,
        download=config.download,
        background=config.background,
    )
    return cifar_sources(config, data)
