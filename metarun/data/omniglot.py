"""Omniglot (Lake et al. 2015) from the official archives: decode once, cache, split, rotate.

The official data are four zip archives (or their extracted folders of the same stem)::

    images_background.zip          30 alphabets, 964 characters
    images_evaluation.zip          20 alphabets, 659 characters
    images_background_small1.zip   5 alphabets, 136 characters (a subset of images_background)
    images_background_small2.zip   5 alphabets, 156 characters (a subset of images_background)

laid out as ``<stem>/<Alphabet>/characterNN/<id>_<drawer>.png`` (105x105, 1-bit, 20 drawers per
character). A character is identified by ``(alphabet, character)``, so one present in several
archives (Greek and Latin are in both small sets) counts once.
"""

from __future__ import annotations

import io
import logging
import random
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor

from metarun.data.download import download_file, find_under, not_found_message, root_hint
from metarun.data.images import (
    ClassPool,
    FewShotConfig,
    ImageLike,
    cached_pools,
    decode_image,
    image_task_sources,
    open_image,
)
from metarun.registry import register
from metarun.spec.checks import require, require_image_model
from metarun.spec.enums import OmniglotSplit
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

BACKGROUND = "images_background"
EVALUATION = "images_evaluation"
SMALL1 = "images_background_small1"
SMALL2 = "images_background_small2"
# Order matters: the first archive holding a character is the one it is read from.
ARCHIVES = (BACKGROUND, EVALUATION, SMALL1, SMALL2)
SPLITS = ("finn", "lake", "random")

DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}"
DOWNLOAD_MD5 = {
    f"{BACKGROUND}.zip": "68d2efa1b9178cc56df9314c21c6e718",
    f"{EVALUATION}.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
FULL_CHARACTERS = 1623
# Finn et al. 2017 (github.com/cbfinn/maml, data_generator.py): 1100 train, 100 val, rest test.
FINN_TRAIN, FINN_VAL = 1100, 100
LAKE_VAL_FRACTION = 0.1
# Part of the cache key: bump when the decoded representation changes. 2: the shared cache of
# metarun.data.images (one pool of every character, channels last); format-1 files
# (omniglot_<archives>_<size>px_<digest>.pt) are never read again, only rebuilt.
_CACHE_FORMAT = 2
# Where root may hold the archives: root itself, or torchvision's / a data folder's subfolder.
_SUBDIRS = ("", "omniglot", "omniglot-py")

CharacterKey = tuple[str, str]  # (alphabet, character)


@dataclass(frozen=True)
class _Source:
    """One archive found on disk, as a zip file or as its extracted folder."""

    stem: str
    path: Path

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"

    def fingerprint(self) -> str:
        """Name, size and mtime: changes whenever the archive does (folders: over all PNGs)."""
        if self.is_zip:
            stat = self.path.stat()
            return f"{self.path.name}:{stat.st_size}:{stat.st_mtime_ns}"
        count = size = mtime = 0
        for png in self.path.rglob("*.png"):
            stat = png.stat()
            count, size, mtime = count + 1, size + stat.st_size, max(mtime, stat.st_mtime_ns)
        return f"{self.path.name}/:{count}:{size}:{mtime}"


@dataclass(frozen=True)
class _Character:
    source: _Source
    files: tuple[str, ...]  # zip member names, or paths relative to the source folder


def _find_sources(root: Path) -> dict[str, _Source]:
    found: dict[str, _Source] = {}
    for stem in ARCHIVES:

        def present(folder: Path, stem: str = stem) -> bool:
            return (folder / f"{stem}.zip").is_file() or (folder / stem).is_dir()

        folder = find_under(root, _SUBDIRS, present)
        if folder is not None:
            # Prefer the zip: one file to read and to fingerprint.
            zipped = folder / f"{stem}.zip"
            found[stem] = _Source(stem, zipped if zipped.is_file() else folder / stem)
    return found


def _not_found_message(root: Path) -> str:
    return not_found_message(
        "Omniglot",
        root,
        _SUBDIRS,
        f"{', '.join(f'{stem}.zip' for stem in ARCHIVES)} (or their extracted folders of the "
        "same name)",
        f"set dataset.root=<folder holding these files>, or set dataset.download=true on a "
        f"machine with network to fetch {BACKGROUND}.zip and {EVALUATION}.zip from "
        "https://github.com/brendenlake/omniglot",
    )


def _download(root: Path, sources: dict[str, _Source]) -> None:
    """Fetch the full background and evaluation archives that are missing, checking MD5."""
    for stem in (BACKGROUND, EVALUATION):
        if stem in sources:
            continue
        name = f"{stem}.zip"
        download_file(
            DOWNLOAD_URL.format(name=name),
            root / name,
            DOWNLOAD_MD5[name],
            where=f"; the archives are read from {root_hint(root)}",
        )
        sources[stem] = _Source(stem, root / name)


def _corrupt_message(path: Path, error: BaseException) -> str:
    """A damaged archive: name it and say how to replace it."""
    return (
        f"cannot read the Omniglot archive {str(path)!r} ({type(error).__name__}: {error}): it "
        f"is empty, truncated or not a zip file. Fix: delete it and rerun with "
        f"dataset.download=true, or put the official {path.name} there (from "
        f"https://github.com/brendenlake/omniglot)"
    )


def _index(source: _Source) -> dict[CharacterKey, list[str]]:
    """``(alphabet, character) -> [image file, ...]`` sorted by file name (drawer order).

    Raises:
        ValueError: the zip archive is damaged (empty, truncated, not a zip).
    """
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as archive:
                names = [n for n in archive.namelist() if n.lower().endswith(".png")]
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise ValueError(_corrupt_message(source.path, error)) from None
    else:
        names = [p.relative_to(source.path).as_posix() for p in source.path.rglob("*.png")]
    characters: dict[CharacterKey, list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) < 3 or "__MACOSX" in parts or parts[-1].startswith("."):
            continue  # not an image of the official layout (e.g. macOS resource forks)
        characters.setdefault((parts[-3], parts[-2]), []).append(name)
    for files in characters.values():
        files.sort(key=lambda n: n.rsplit("/", 1)[-1])
    return characters


def _index_all(sources: dict[str, _Source]) -> dict[CharacterKey, _Character]:
    characters: dict[CharacterKey, _Character] = {}
    for stem in ARCHIVES:
        if stem not in sources:
            continue
        for key, files in _index(sources[stem]).items():
            characters.setdefault(key, _Character(sources[stem], tuple(files)))
    return characters


# The preprocessing, in three steps that the loader (decode, cache, select) and ``transform``
# (one image for the Python API) share: the same pixels, bit for bit.


def grey_pixels(image: Image.Image, image_size: int) -> bytes:
    """An image -> ``image_size**2`` bytes of 8-bit grey (not yet inverted), row-major."""
    # The LANCZOS (antialiased) resize of Finn et al.'s omniglot_resized preprocessing.
    return decode_image(image, image_size, channels=1).tobytes()


def invert(images: Tensor) -> Tensor:
    """Omniglot draws black strokes on white; the models see strokes 255 on background 0."""
    return 255 - images


def to_unit(images: Tensor) -> Tensor:
    """uint8 -> float32 in ``[0, 1]``."""
    return images.float().div_(255.0)


def transform(image: ImageLike, image_size: int = 28) -> Tensor:
    """One character image (a PIL image, a path or the bytes of a PNG like the archives', or a
    uint8 ``(H, W)`` array, black on white as drawn) -> the model's input
    ``(1, image_size, image_size)`` float32, exactly as :func:`load_omniglot` prepares the
    archives' images: grey, LANCZOS-resized, inverted, scaled to ``[0, 1]``."""
    pixels = torch.frombuffer(
        bytearray(grey_pixels(open_image(image), image_size)), dtype=torch.uint8
    )
    return to_unit(invert(pixels)).view(1, image_size, image_size)


def _decode_image(data: bytes, image_size: int) -> bytes:
    """One PNG -> ``image_size**2`` bytes of 8-bit grey (not yet inverted), row-major."""
    with Image.open(io.BytesIO(data)) as image:
        return grey_pixels(image, image_size)


def _decode(
    keys: Sequence[CharacterKey], characters: dict[CharacterKey, _Character], image_size: int
) -> Tensor:
    """Decode every image: ``(C, M, S, S, 1)`` uint8 (a :class:`ClassPool`'s layout), strokes
    255 and background 0."""
    counts = {len(characters[k].files) for k in keys}
    if len(counts) != 1:
        by_count = {len(characters[k].files): k for k in keys}
        raise ValueError(
            f"Omniglot characters must all have the same number of images, found counts "
            f"{sorted(counts)} (e.g. {by_count}); an archive is truncated: replace it with the "
            f"official one"
        )
    per_class = counts.pop()
    buffer = bytearray()
    open_zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for key in keys:
            character = characters[key]
            source = character.source
            for name in character.files:
                # A member with a bad CRC or deflate stream, or bytes that are not a PNG
                # (PIL's UnidentifiedImageError is an OSError): a damaged archive or folder.
                try:
                    if source.is_zip:
                        if source.path not in open_zips:
                            open_zips[source.path] = zipfile.ZipFile(source.path)
                        data = open_zips[source.path].read(name)
                    else:
                        data = (source.path / name).read_bytes()
                    buffer += _decode_image(data, image_size)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                    where = source.path if source.is_zip else source.path / name
                    raise ValueError(_corrupt_message(where, error)) from None
    finally:
        for archive in open_zips.values():
            archive.close()
    images = torch.frombuffer(buffer, dtype=torch.uint8)
    return invert(images).view(len(keys), per_class, image_size, image_size, 1)


def _name(key: CharacterKey) -> str:
    """A character's class name: its folder path, ``Alphabet/characterNN``."""
    return f"{key[0]}/{key[1]}"


def _decoded(
    sources: dict[str, _Source],
    characters: dict[CharacterKey, _Character],
    image_size: int,
    cache_dir: str | Path | None,
    root: Path,
) -> ClassPool:
    """Every character decoded, in ``(alphabet, character)`` order, through the shared cache
    (keyed by the archives' fingerprints and the image size)."""
    used = [sources[stem].fingerprint() for stem in ARCHIVES if stem in sources]
    keys = sorted(characters)

    def decode() -> dict[str, ClassPool]:
        logger.info("decoding %d Omniglot characters from %s", len(keys), root)
        images = _decode(keys, characters, image_size)
        return {"characters": ClassPool(tuple(_name(k) for k in keys), images)}

    key = f"omniglot-v{_CACHE_FORMAT}|size{image_size}|{'|'.join(used)}"
    return cached_pools("omniglot", key, cache_dir, decode, splits=("characters",))["characters"]


def _split_keys(
    keys: Sequence[CharacterKey],
    characters: dict[CharacterKey, _Character],
    split: str,
    fractions: Sequence[float],
    seed: int,
    root: Path,
) -> dict[str, list[CharacterKey]]:
    ordered = sorted(keys)
    present = sorted({characters[k].source.stem for k in keys})
    if split == "finn":
        missing = [f"{s}.zip" for s in (BACKGROUND, EVALUATION) if s not in present]
        if missing or len(ordered) != FULL_CHARACTERS:
            reason = (
                f"{', '.join(missing)} missing"
                if missing
                else f"found {len(ordered)} characters (an archive is incomplete)"
            )
            raise ValueError(
                f"dataset.split=finn needs the full Omniglot ({FULL_CHARACTERS} characters from "
                f"{BACKGROUND}.zip and {EVALUATION}.zip) but {reason} under {root_hint(root)} "
                f"(found: {', '.join(present)}; {len(ordered)} characters). Fix: set "
                f"dataset.download=true on a machine with network, or use dataset.split=random "
                f"(fractions of the characters present) or dataset.split=lake"
            )
        random.Random(seed).shuffle(ordered)
        return {
            "train": ordered[:FINN_TRAIN],
            "val": ordered[FINN_TRAIN : FINN_TRAIN + FINN_VAL],
            "test": ordered[FINN_TRAIN + FINN_VAL :],
        }
    if split == "lake":
        background = [k for k in ordered if characters[k].source.stem != EVALUATION]
        evaluation = [k for k in ordered if characters[k].source.stem == EVALUATION]
        if not evaluation or not background:
            absent = f"{EVALUATION}.zip" if not evaluation else f"{BACKGROUND}.zip"
            raise ValueError(
                f"dataset.split=lake needs background alphabets for train and {EVALUATION}.zip "
                f"for test, but {absent} is missing under {root_hint(root)} (found: "
                f"{', '.join(present)}). Fix: set dataset.download=true on a machine with "
                f"network, or use dataset.split=random (fractions of the characters present)"
            )
        random.Random(seed).shuffle(background)
        num_val = max(1, round(LAKE_VAL_FRACTION * len(background)))
        return {"train": background[num_val:], "val": background[:num_val], "test": evaluation}
    # random
    random.Random(seed).shuffle(ordered)
    total = float(sum(fractions))
    bounds = [0]
    cumulative = 0.0
    for fraction in fractions:
        cumulative += fraction
        bounds.append(round(cumulative / total * len(ordered)))
    parts = {
        name: ordered[bounds[i] : bounds[i + 1]] for i, name in enumerate(("train", "val", "test"))
    }
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise ValueError(
            f"dataset.fractions={tuple(fractions)} over the {len(ordered)} characters present "
            f"leaves no class in split(s) {', '.join(empty)} (sizes "
            f"{ {n: len(p) for n, p in parts.items()} }). Fix: raise those fractions, e.g. "
            f"dataset.fractions=[0.7,0.15,0.15], or add data under dataset.root"
        )
    return parts


def _check_arguments(split: str, fractions: Sequence[float], image_size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"dataset.split must be one of {', '.join(SPLITS)}, got {split!r}")
    if image_size < 1:
        raise ValueError(f"dataset.image_size must be >= 1, got {image_size}")
    values = list(fractions)
    if len(values) != 3 or any(not f >= 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"dataset.fractions must be 3 non-negative numbers (train, val, test) summing to 1, "
            f"got {tuple(values)} (set e.g. dataset.fractions=[0.7,0.15,0.15])"
        )


def _with_rotations(images: Tensor) -> Tensor:
    """``(C, M, 1, S, S) -> (4C, M, 1, S, S)``: class ``r*C + c`` is class ``c`` rotated by
    ``r * 90`` degrees (Santoro et al. 2016; Finn et al. 2017, Sec. 5.2)."""
    return torch.cat([torch.rot90(images, r, dims=(-2, -1)) for r in range(4)])


def load_omniglot(
    root: str | Path,
    *,
    split: str = "finn",
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 1,
    download: bool = False,
    rotations: bool = True,
    image_size: int = 28,
    cache_dir: str | Path | None = None,
) -> dict[str, Tensor]:
    """Load Omniglot from the official archives and split its characters into classes.

    Args:
        root: folder holding the archives (zips or extracted folders), directly or in an
            ``omniglot/`` or ``omniglot-py/`` subfolder.
        split: ``"finn"`` (Finn et al. 2017: all 1623 characters sorted by (alphabet, character),
            shuffled with ``random.Random(seed)``; 1100 train, 100 val, 423 test), ``"lake"``
            (background alphabets train, a seeded 10% of their characters val, evaluation
            alphabets test) or ``"random"`` (``fractions`` of whatever characters are present,
            shuffled with ``seed``).
        fractions: ``(train, val, test)`` fractions for ``split="random"``; ignored otherwise.
        seed: seed of the character shuffle.
        download: fetch the missing ``images_background.zip`` and ``images_evaluation.zip``
            from the Omniglot GitHub repository into ``root`` (MD5-checked).
        rotations: add each character rotated by 90, 180 and 270 degrees as three more classes
            of the same split (C characters -> 4C classes).
        image_size: side of the resized square images.
        cache_dir: where the decoded images are cached (default ``$XDG_CACHE_HOME/metarun`` or
            ``~/.cache/metarun``: data folders are often shared or read-only).

    Returns:
        ``{"train", "val", "test"}`` -> ``(C, 20, 1, image_size, image_size)`` float32 in
        ``[0, 1]``, strokes near 1 and background 0.

    Raises:
        FileNotFoundError: no archive under ``root`` and ``download=False``.
        DownloadError: ``download=True`` but the download failed or its checksum is wrong (a
            ValueError).
        ValueError: bad arguments, or a split the archives present cannot make.
    """
    _check_arguments(split, fractions, image_size)
    root = Path(root).expanduser()
    sources = _find_sources(root)
    if download:
        _download(root, sources)
    if not sources:
        raise FileNotFoundError(_not_found_message(root))
    characters = _index_all(sources)
    if not characters:
        raise FileNotFoundError(
            f"no <Alphabet>/characterNN/*.png images in "
            f"{', '.join(str(s.path) for s in sources.values())}; " + _not_found_message(root)
        )
    # Split first (cheap: names only), so an impossible split fails before any decoding.
    parts = _split_keys(list(characters), characters, split, fractions, seed, root)

    pool = _decoded(sources, characters, image_size, cache_dir, root)
    position = {name: i for i, name in enumerate(pool.names)}
    out: dict[str, Tensor] = {}
    for name, part in parts.items():
        chosen = pool.images[torch.tensor([position[_name(k)] for k in part], dtype=torch.long)]
        # (C, M, S, S, 1) -> (C, M, 1, S, S) in [0, 1]
        unit = to_unit(chosen.movedim(-1, -3).contiguous())
        out[name] = _with_rotations(unit) if rotations else unit
    return out


@dataclass
class OmniglotConfig(FewShotConfig):
    """``dataset=omniglot``: N-way K-shot character classification (Finn et al. 2017, Sec. 5.2)."""

    root: str = "${oc.env:METARUN_DATA,data}/omniglot"
    split: OmniglotSplit = OmniglotSplit.finn
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 1
    download: bool = False
    rotations: bool = True
    image_size: int = 28

    models: ClassVar[tuple[str, ...]] = ("conv4",)
    option: ClassVar[str] = "omniglot"
    min_image_size: ClassVar[int] = 4
    image_size_example: ClassVar[str] = "dataset.image_size=28"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            len(self.fractions) == 3
            and all(f >= 0 for f in self.fractions)
            and abs(sum(self.fractions) - 1.0) < 1e-6,
            "dataset.fractions",
            list(self.fractions),
            "3 non-negative numbers (train, val, test) summing to 1",
            "dataset.fractions=[0.7,0.15,0.15]",
        )

    def check_model(self, model: Any) -> None:
        require_image_model(
            model,
            n_way=self.n_way,
            image_size=self.image_size,
            channels=1,
            colours="1 for dataset=omniglot (grayscale)",
        )

    def transform(self, image: ImageLike) -> Tensor:
        """One raw character image -> this run's model input (:func:`transform` at
        ``dataset.image_size``)."""
        return transform(image, self.image_size)


@register("dataset", "omniglot", OmniglotConfig)
def build_omniglot(config: OmniglotConfig) -> TaskSources:
    # Float pools in CPU memory: the trainer's prefetch thread samples there and copies each
    # meta-batch to the device through pinned memory, overlapping with the previous step.
    pools = load_omniglot(
        config.root,
        split=config.split.value,
        fractions=tuple(config.fractions),
        seed=config.split_seed,
        download=config.download,
        rotations=config.rotations,
        image_size=config.image_size,
        cache_dir=config.cache_dir,
    )
    return image_task_sources(config, pools)
