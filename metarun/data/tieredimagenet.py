"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes under 34 superclasses, split by
superclass 20/6/8 (351/97/160 classes; 448,695/124,261/206,209 images), 84x84 RGB.

Read from ``dataset.root`` (or its ``tiered-imagenet``/``tiered_imagenet`` subfolder), in either
of the formats distributed:

(a) the compressed caches of Ren et al.'s code, ``{train,val,test}_images_png.pkl`` (a pickled
    list of PNG-encoded images, each a uint8 array of the file's bytes) with
    ``{train,val,test}_labels.pkl`` (a dict: ``label_specific`` (N,) class index of each image,
    ``label_specific_str`` the class names, ``label_general`` / ``label_general_str`` the
    superclass of each image and their names);
(b) image folders ``{train,val,test}/<class>/*.{png,jpg,jpeg}`` (any size, resized to 84x84).

The classes hold 732 to 1300 images, so a split is stored flat with class offsets
(:class:`~metarun.data.images.ClassPool`); tasks draw uniformly from each class's own images.
The split is the one of the files. Where the files name their classes by WordNet id (Ren et al.'s
``label_specific_str``, or ImageNet-style folder names), each split is checked against the
published class list (:mod:`metarun.data.tiered_classes`) and a warning names the classes of
another split, unknown classes and missing ones; other names are only counted. A class in two
splits of the files is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from metarun.data.download import find_layout
from metarun.data.download import not_found_message as _not_found
from metarun.data.images import (
    SPLITS,
    ClassPool,
    FewShotImageConfig,
    cached_pools,
    decode_bytes,
    fingerprint,
    image_task_sources,
    load_pickle,
)
from metarun.data.miniimagenet import IMAGENET_MEAN, IMAGENET_STD, check_split
from metarun.data.pickles import text
from metarun.data.tiered_classes import SPLIT_OF, TIERED_CLASSES, WNID
from metarun.registry import register
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

_SUBDIRS = ("", "tiered-imagenet", "tiered_imagenet", "tieredimagenet")
IMAGES = "{split}_images_png.pkl"
LABELS = "{split}_labels.pkl"
SIDE = 84
_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Ren et al. 2018, Sec. 4.2 (and their tiered_imagenet_split): superclasses and classes per split.
PUBLISHED = {
    "train": {"superclasses": 20, "classes": 351, "images": 448_695},
    "val": {"superclasses": 6, "classes": 97, "images": 124_261},
    "test": {"superclasses": 8, "classes": 160, "images": 206_209},
}


def not_found_message(root: Path) -> str:
    expected = "; ".join(
        f"{IMAGES.format(split=s)} + {LABELS.format(split=s)} ({PUBLISHED[s]['images']:,} "
        f"images of {PUBLISHED[s]['classes']} classes)"
        for s in SPLITS
    )
    return _not_found(
        "tieredImageNet",
        root,
        _SUBDIRS,
        f"either (a) Ren et al.'s files {expected}, or (b) image folders train/, val/ and test/ "
        f"holding <class>/*.png or *.jpg. There is no download",
        "put either set of files in one of these folders, or set dataset.root=<folder holding "
        "them>. Verify: metarun checks the labels against the images and logs the classes and "
        "superclasses it found per split (published: 351/97/160 classes, 20/6/8 superclasses)",
    )


def _pickles(folder: Path) -> bool:
    return all(
        (folder / IMAGES.format(split=s)).is_file() and (folder / LABELS.format(split=s)).is_file()
        for s in SPLITS
    )


def _find(root: Path) -> tuple[str, Path] | None:
    return find_layout(
        root,
        _SUBDIRS,
        [("pickle", _pickles), ("folders", lambda f: all((f / s).is_dir() for s in SPLITS))],
    )


def _ragged(
    names: list[str], blobs_by_class: list[list[Any]], image_size: int, where: str, read: Any
) -> ClassPool:
    """Decode each class's images into one flat uint8 pool with class offsets."""
    buffer = bytearray()
    counts = []
    for blobs in blobs_by_class:
        counts.append(len(blobs))
        for blob in blobs:
            buffer += decode_bytes(read(blob), image_size, where)
    empty = [n for n, c in zip(names, counts, strict=True) if c == 0]
    if empty:
        raise ValueError(f"{where}: classes without images: {empty[:5]}. Fix: replace the files")
    images = torch.frombuffer(buffer, dtype=torch.uint8).view(-1, image_size, image_size, 3)
    offsets = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
    return ClassPool(tuple(names), images.clone(), offsets)


def _read_pickles(folder: Path, split: str, image_size: int) -> tuple[ClassPool, int]:
    images_path, labels_path = (
        folder / IMAGES.format(split=split),
        folder / LABELS.format(split=split),
    )
    fix = f"replace {images_path.name} and {labels_path.name} with complete copies"
    labels = load_pickle(labels_path, fix)
    try:
        labels = {text(k): v for k, v in labels.items()}
        specific = torch.as_tensor(labels["label_specific"], dtype=torch.long)
        names = [text(n) for n in labels["label_specific_str"]]
        general = torch.as_tensor(labels["label_general"], dtype=torch.long)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{labels_path}: expected a dict with label_specific, label_specific_str and "
            f"label_general ({type(error).__name__}: {error}). Fix: {fix}"
        ) from None
    blobs = load_pickle(images_path, fix)
    if not isinstance(blobs, list | tuple) and not hasattr(blobs, "__len__"):
        raise ValueError(f"{images_path}: expected a list of PNG-encoded images. Fix: {fix}")
    if len(blobs) != len(specific) or len(general) != len(specific):
        raise ValueError(
            f"{images_path} holds {len(blobs)} images but {labels_path} labels "
            f"{len(specific)} (and {len(general)} superclass labels). Fix: {fix}"
        )
    if len(specific) and (int(specific.min()) < 0 or int(specific.max()) >= len(names)):
        raise ValueError(f"{labels_path}: label_specific out of range of its names. Fix: {fix}")
    rows = [(specific == c).nonzero().squeeze(1).tolist() for c in range(len(names))]

    def read(blob: Any) -> bytes:
        return bytes(blob.tobytes() if hasattr(blob, "tobytes") else blob)

    pool = _ragged(names, [[blobs[i] for i in r] for r in rows], image_size, str(images_path), read)
    return pool, len(set(general.tolist()))


def _read_folders(folder: Path, split: str, image_size: int) -> tuple[ClassPool, int]:
    base = folder / split
    classes = sorted(p for p in base.iterdir() if p.is_dir())
    files = [sorted(f for f in c.iterdir() if f.suffix.lower() in _EXTENSIONS) for c in classes]
    pool = _ragged([c.name for c in classes], files, image_size, str(base), Path.read_bytes)
    return pool, 0  # the folders do not say the superclasses


def _some(wnids: Sequence[str], shown: int = 3) -> str:
    more = f", ... {len(wnids) - shown} more" if len(wnids) > shown else ""
    return ", ".join(wnids[:shown]) + more


def split_differences(names: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """How the classes of each split of the files differ from Ren et al.'s published split: one
    phrase per split that differs (none when the files follow the published split).

    Names are matched as WordNet ids; a split with none (e.g. folders named by class words) is
    only compared by its number of classes, since its names cannot be matched.
    """
    differences = {}
    for split in SPLITS:
        found = list(names[split])
        published = TIERED_CLASSES[split]
        head = f"{split}: {len(found)} classes, the published split has {len(published)}"
        if not any(WNID.fullmatch(name) for name in found):
            if len(found) != len(published):
                example = f"e.g. {found[0]!r}, " if found else ""
                differences[split] = (
                    f"{head} (the class names, {example}are not WordNet ids, so they cannot be "
                    f"matched with the published list)"
                )
            continue
        parts = []
        for other in SPLITS:
            moved = sorted(n for n in found if other != split and SPLIT_OF.get(n) == other)
            if moved:
                parts.append(f"{len(moved)} of them are published {other} classes ({_some(moved)})")
        unknown = sorted(n for n in found if n not in SPLIT_OF)
        if unknown:
            parts.append(f"{len(unknown)} are in no published split ({_some(unknown)})")
        present = set(found)
        missing = [c for c in published if c not in present]
        if missing:
            parts.append(f"{len(missing)} published {split} classes are missing ({_some(missing)})")
        if parts:
            differences[split] = f"{head}; " + "; ".join(parts)
    return differences


def load_tieredimagenet(
    root: str | Path, *, image_size: int = SIDE, cache_dir: str | None = None
) -> dict[str, ClassPool]:
    """The tieredImageNet class pools (flat, with class offsets).

    Raises:
        FileNotFoundError: neither format under ``root`` (the message says what to put where).
        ValueError: damaged or inconsistent files, or a class in two splits.
    """
    root = Path(root).expanduser()
    found = _find(root)
    if found is None:
        raise FileNotFoundError(not_found_message(root))
    kind, folder = found
    superclasses: dict[str, int] = {}

    def decode() -> dict[str, ClassPool]:
        read = _read_pickles if kind == "pickle" else _read_folders
        pools = {}
        for split in SPLITS:
            logger.info("decoding the tieredImageNet %s images in %s", split, folder)
            pools[split], superclasses[split] = read(folder, split, image_size)
        return pools

    if kind == "pickle":
        files = [folder / f.format(split=s) for s in SPLITS for f in (IMAGES, LABELS)]
        key = fingerprint(files)
    else:
        key = fingerprint([folder / s for s in SPLITS])
    pools = cached_pools("tieredimagenet", f"{kind}|{key}|size{image_size}", cache_dir, decode)
    check_split(pools, {s: pools[s].names for s in SPLITS}, f"tieredImageNet in {folder}")
    differences = split_differences({s: pools[s].names for s in SPLITS})
    for split in SPLITS:
        if split in differences:
            logger.warning(
                "tieredImageNet in %s, %s. Results are not comparable with the published ones. "
                "Fix: use Ren et al.'s split (metarun.data.tiered_classes lists it)",
                folder,
                differences[split],
            )
        if superclasses.get(split):
            logger.info("tieredImageNet %s: %d superclasses", split, superclasses[split])
    return pools


@dataclass
class TieredImageNetConfig(FewShotImageConfig):
    """``dataset=tieredimagenet``: N-way K-shot tieredImageNet (Ren et al. 2018)."""

    root: str = "${oc.env:METARUN_DATA,data}/tieredimagenet"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    option: ClassVar[str] = "tieredimagenet"


@register("dataset", "tieredimagenet", TieredImageNetConfig)
def build_tieredimagenet(config: TieredImageNetConfig) -> TaskSources:
    pools = load_tieredimagenet(
        config.root, image_size=config.image_size, cache_dir=config.cache_dir
    )
    return image_task_sources(config, pools)
