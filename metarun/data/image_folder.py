"""``dataset=image_folder``: few-shot tasks from a folder of your own images, a folder per class.

A class is a folder that holds image files directly (any format Pillow reads: PNG, JPEG, BMP,
GIF, TIFF, WebP); it may sit at any depth below ``dataset.root``, and is named by its path
relative to the split's folder (``Alphabet/character01``: Omniglot's layout works as it is).
Images of any size are decoded once to RGB (grey images are repeated over the channels) or,
with ``dataset.channels=1``, to 8-bit grey; resized to ``dataset.image_size`` with LANCZOS;
inverted (``255 - pixel``) with ``dataset.invert=true``; and kept in the uint8 cache like the
benchmarks. ``dataset.channels=1 dataset.invert=true dataset.mean=[0] dataset.std=[1]
dataset.image_size=28`` gives a folder of Omniglot PNGs exactly the pixels ``dataset=omniglot``
gives its characters.

Splits by class (``dataset.split``):

- ``folders``: ``root/train``, ``root/val`` and ``root/test`` hold their own classes;
- ``files``: ``train.txt``, ``val.txt`` and ``test.txt`` in ``dataset.split_dir`` (default: the
  root) list the class names, one per line (``#`` starts a comment);
- ``random``: the classes shuffled with ``dataset.split_seed`` and cut by
  ``dataset.split_fractions``;
- ``auto`` (default): ``folders`` when the three folders exist, else ``files`` when the three
  lists exist, else ``random``.

A class with fewer images than a task draws (``k_shot + k_query``, or the evaluation's) is
refused with a message naming it; ``dataset.few_images=skip`` drops such classes with a
warning instead.

    metarun dataset=image_folder dataset.root=$HOME/data/my_microscope dataset.image_size=84
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from metarun.data.images import (
    SPLITS,
    ClassPool,
    FewShotImageConfig,
    ImageLike,
    cached_pools,
    decode_image,
    fingerprint,
    image_task_sources,
    normalise,
    open_image,
)
from metarun.registry import register
from metarun.spec.checks import require
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LIST_FILES = {split: f"{split}.txt" for split in SPLITS}


class FolderSplit(str, Enum):
    auto = "auto"
    folders = "folders"
    files = "files"
    random = "random"


class FewImages(str, Enum):
    error = "error"
    skip = "skip"


@dataclass
class OwnImagesConfig(FewShotImageConfig):
    """Keys of the datasets made from a user's images: the class split and the too-few rule."""

    split_fractions: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.2])
    split_seed: int = 0
    few_images: FewImages = FewImages.error
    # Every class in the test split (train and val empty): a dataset that only tests, as a
    # cross-domain test_dataset.
    test_only: bool = False
    # 3: RGB (grey images repeated over the channels); 1: 8-bit grey, as dataset=omniglot
    # decodes its characters (with dataset.mean=[0] dataset.std=[1] and dataset.invert=true,
    # the same pixels).
    channels: int = 3
    # 255 - pixel after decoding: dark strokes on a light page (Omniglot's) become bright
    # strokes on a dark background, what dataset=omniglot's models see.
    invert: bool = False

    def image_channels(self) -> int:
        return self.channels

    def __post_init__(self) -> None:
        require(
            self.channels in (1, 3),
            "dataset.channels",
            self.channels,
            "1 (grey) or 3 (RGB)",
            "dataset.channels=1",
        )
        super().__post_init__()
        fractions = list(self.split_fractions)
        require(
            len(fractions) == 3
            and all(f > 0 for f in fractions)
            and abs(sum(fractions) - 1) < 1e-6,
            "dataset.split_fractions",
            fractions,
            "three positive fractions (train, val, test) summing to 1",
            "dataset.split_fractions=[0.64,0.16,0.2]",
        )

    def transform(self, image: ImageLike) -> Tensor:
        """One raw image -> the model's input ``(channels, image_size, image_size)``, as this
        dataset's tasks give it (decoded as the loader does, inverted if ``dataset.invert``,
        normalised with ``dataset.mean`` / ``dataset.std``)."""
        pixels = decode_pixels(open_image(image), self.image_size, self.channels, self.invert)
        return normalise(pixels, self.mean, self.std)

    def needed(self, split: str) -> int:
        """Images a class of ``split`` needs for one task."""
        if split == "train":
            return self.k_shot + self.k_query
        return (self.eval_k_shot or self.k_shot) + (self.eval_k_query or self.k_query)


@dataclass
class ImageFolderConfig(OwnImagesConfig):
    """``dataset=image_folder``: a folder per class of your own images."""

    root: str = "${oc.env:METARUN_DATA,data}/images"
    split: FolderSplit = FolderSplit.auto
    split_dir: str | None = None  # split=files: where train.txt/val.txt/test.txt are; null = root

    option: ClassVar[str] = "image_folder"


def class_folders(base: Path) -> dict[str, list[Path]]:
    """Every folder below ``base`` that holds image files, by its path relative to ``base``
    (``/``-separated), with its image files in name order."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in [base, *base.rglob("*")] if p.is_dir()):
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS
        )
        if files and folder != base:
            found[folder.relative_to(base).as_posix()] = files
    return found


def cut_classes(
    names: list[str], fractions: list[float], seed: int, test_only: bool = False
) -> dict[str, list[str]]:
    """Classes shuffled with ``seed`` and cut by ``fractions`` (train, val, test), each split's
    names sorted; ``test_only``: every class in the test split."""
    if test_only:
        return {"train": [], "val": [], "test": sorted(names)}
    names = list(names)
    random.Random(seed).shuffle(names)
    n_train = round(fractions[0] * len(names))
    n_val = round(fractions[1] * len(names))
    return {
        "train": sorted(names[:n_train]),
        "val": sorted(names[n_train : n_train + n_val]),
        "test": sorted(names[n_train + n_val :]),
    }


def _read_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def _not_found(root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset.root={str(root)!r}: no folder of images found there (resolved: "
        f"{root.resolve()}). Fix: set dataset.root=<folder> where each class is a folder of "
        f"image files ({', '.join(EXTENSIONS)}), at any depth; optionally with train/, val/ "
        "and test/ folders or train.txt/val.txt/test.txt lists of class names "
        "(docs: metarun/data/image_folder.py)"
    )


def split_classes(config: ImageFolderConfig, root: Path) -> dict[str, dict[str, list[Path]]]:
    """Each split's classes and their image files, per ``dataset.split``.

    Raises:
        FileNotFoundError: no images under the root, or a listed file missing.
        ValueError: a class listed in two splits, a listed class that does not exist, or a
            split without classes.
    """
    if not root.is_dir():
        raise _not_found(root)
    lists = Path(config.split_dir).expanduser() if config.split_dir else root
    mode = config.split
    if config.test_only:
        mode = FolderSplit.random  # every class below the root goes to the test split
    elif mode is FolderSplit.auto:
        if all((root / s).is_dir() for s in SPLITS):
            mode = FolderSplit.folders
        elif all((lists / f).is_file() for f in LIST_FILES.values()):
            mode = FolderSplit.files
        else:
            mode = FolderSplit.random
    if mode is FolderSplit.folders:
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"dataset.split=folders needs {', '.join(f'{root}/{s}/' for s in missing)}. "
                "Fix: create them, or set dataset.split=random"
            )
        splits = {s: class_folders(root / s) for s in SPLITS}
    else:
        classes = class_folders(root)
        if not classes:
            raise _not_found(root)
        if mode is FolderSplit.files:
            splits = {}
            for split, name in LIST_FILES.items():
                path = lists / name
                if not path.is_file():
                    raise FileNotFoundError(
                        f"dataset.split=files needs {path}. Fix: write the class names of the "
                        f"{split} split there, one per line, or set dataset.split=random"
                    )
                listed = _read_list(path)
                unknown = [n for n in listed if n not in classes]
                if unknown:
                    raise ValueError(
                        f"{path} lists classes that are not folders of images under {root}: "
                        f"{unknown[:5]}. Fix: correct the names (paths relative to the root)"
                    )
                splits[split] = {n: classes[n] for n in listed}
        else:
            cuts = cut_classes(
                sorted(classes), config.split_fractions, config.split_seed, config.test_only
            )
            splits = {s: {n: classes[n] for n in cut} for s, cut in cuts.items()}
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in splits[split]:
            if name in seen and mode is not FolderSplit.folders:
                raise ValueError(
                    f"class {name!r} is in both the {seen[name]} and the {split} split. Fix: "
                    "list each class in one split only"
                )
            seen[name] = split
    return splits


def enough_images(config: OwnImagesConfig, splits: dict[str, dict[str, list[Any]]]) -> None:
    """Refuse (or drop, with ``few_images=skip``) classes with too few images for a task, and
    splits with too few classes."""
    for split in SPLITS:
        if config.test_only and split != "test":
            continue
        need = config.needed(split)
        few = {n: len(f) for n, f in splits[split].items() if len(f) < need}
        if few and config.few_images is FewImages.error:
            shown = ", ".join(f"{n} ({c})" for n, c in list(few.items())[:5])
            raise ValueError(
                f"dataset={config.option}: {len(few)} {split} classes have fewer than the {need} "
                f"images a task draws from each (k_shot + k_query): {shown}. Fix: lower "
                "dataset.k_shot/k_query, add images, or set dataset.few_images=skip to leave "
                "these classes out"
            )
        if few:
            logger.warning(
                "dataset.few_images=skip: leaving out %d %s classes with fewer than %d images (%s)",
                len(few),
                split,
                need,
                ", ".join(list(few)[:5]),
            )
            splits[split] = {n: f for n, f in splits[split].items() if n not in few}
        ways = config.n_way if split == "train" else config.ways()[1]
        if len(splits[split]) < ways:
            raise ValueError(
                f"dataset.n_way={ways} exceeds the {len(splits[split])} classes of the {split} "
                f"split of dataset={config.option}. Fix: lower dataset.n_way (or eval_n_way), or "
                "give the split more classes (dataset.split_fractions)"
            )


def decode_pixels(image: Any, image_size: int, channels: int = 3, invert: bool = False) -> Tensor:
    """A PIL image -> uint8 ``(image_size, image_size, channels)`` (:func:`decode_image`)."""
    pixels = torch.from_numpy(np.array(decode_image(image, image_size, channels)))
    pixels = pixels.view(image_size, image_size, channels)
    return 255 - pixels if invert else pixels


def decode_classes(
    files_by_class: dict[str, list[Any]], image_size: int, channels: int = 3, invert: bool = False
) -> ClassPool:
    """Decode each class's images (paths, or functions returning an image) into one flat
    uint8 pool with class offsets."""
    images, counts = [], []
    for files in files_by_class.values():
        counts.append(len(files))
        for item in files:
            try:
                image = item() if callable(item) else open_image(item)
                images.append(decode_pixels(open_image(image), image_size, channels, invert))
            except ValueError as error:
                raise ValueError(f"{item}: {error}. Fix: replace or remove the file") from None
    offsets = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
    stacked = torch.stack(images) if images else torch.zeros(0, image_size, image_size, channels)
    return ClassPool(tuple(files_by_class), stacked.to(torch.uint8), offsets)


def cached_own_pools(
    config: OwnImagesConfig, dataset: str, key: str, splits: dict[str, dict[str, list[Any]]]
) -> dict[str, ClassPool]:
    """Check the classes' sizes, then the pools decoded once and cached under ``key``."""
    enough_images(config, splits)
    # Grey or inverted pools are other cache entries; RGB keeps the key it always had.
    look = ("|grey" if config.channels == 1 else "") + ("|inverted" if config.invert else "")
    return cached_pools(
        dataset,
        f"{key}|size{config.image_size}{look}",
        config.cache_dir,
        lambda: {
            s: decode_classes(splits[s], config.image_size, config.channels, config.invert)
            for s in SPLITS
        },
    )


def own_task_sources(config: OwnImagesConfig, pools: dict[str, ClassPool]) -> TaskSources:
    """The task sources of a user's images; a test-only dataset's test classes stand in for
    the training and validation ones, so that every source exists (only the test one is
    drawn from)."""
    if config.test_only:
        pools = {split: pools["test"] for split in pools}
    return image_task_sources(config, pools)


def load_image_folder(config: ImageFolderConfig) -> dict[str, ClassPool]:
    """The class pools of each split, decoded once and cached."""
    root = Path(config.root).expanduser()
    splits = split_classes(config, root)
    files = [f for split in SPLITS for fs in splits[split].values() for f in fs]
    names = "|".join(f"{s}:{','.join(splits[s])}" for s in SPLITS)
    return cached_own_pools(
        config, "image_folder", f"{root.resolve()}|{names}|{fingerprint(files)}", splits
    )


@register("dataset", "image_folder", ImageFolderConfig)
def build_image_folder(config: ImageFolderConfig) -> TaskSources:
    return own_task_sources(config, load_image_folder(config))
