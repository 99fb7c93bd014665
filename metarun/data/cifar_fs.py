"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): CIFAR-100's 100 classes
split into disjoint train/val/test classes, 600 32x32 images each (the official 500 training +
100 test images of every class).

Both read torchvision's CIFAR-100 "python version" (``cifar-100-python/`` holding ``train``,
``test`` and ``meta``), looked for in ``<root>``, ``<root>/cifar100`` and ``<root>/cifar``;
``dataset.download=true`` fetches the official archive (MD5-checked, torchvision's URL).

- CIFAR-FS: 64/16/20 classes, the class lists of Bertinetto et al.'s split files
  (``splits/bertinetto/{train,val,test}.txt``, distributed with github.com/bertinetto/r2d2).
- FC100: 12/4/4 of CIFAR-100's 20 superclasses (60/20/20 classes), the superclass indices of
  Oreshkin et al. 2018 (TADAM), Sec. 4 and their supplementary material.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from metarun.data.cifar import cifar_folder, read_cifar100
from metarun.data.images import (
    SPLITS,
    ClassPool,
    FewShotImageConfig,
    cached_pools,
    fingerprint,
    image_task_sources,
    resize_images,
    stack_classes,
)
from metarun.registry import register
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

_SIDE = 32

# Bertinetto et al. 2019 (R2D2), the CIFAR-FS split files of github.com/bertinetto/r2d2, as
# CIFAR-100 fine label names (meta's fine_label_names), here in alphabetical order.
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus",
        "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain",
        "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe",
        "whale", "woman", "worm",
    ),
}  # fmt: skip

# Oreshkin et al. 2018 (TADAM), FC100: CIFAR-100 superclass indices (meta's coarse_label_names
# order: 0 aquatic_mammals, 1 fish, ..., 19 vehicles_2) of each split.
FC100_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (
        8,
        11,
        13,
        16,
    ),  # large carnivores, large omnivores/herbivores, invertebrates, small mammals
    "test": (0, 7, 12, 14),  # aquatic mammals, insects, medium-sized mammals, people
}

# MetaOptNet's CIFAR-FS/FC100 statistics (RGB, of images in [0, 1]).
CIFAR_MEAN = [0.5074, 0.4867, 0.4411]
CIFAR_STD = [0.2675, 0.2566, 0.2763]


def split_classes(
    option: str, fine_names: list[str], coarse_of: dict[str, int]
) -> dict[str, tuple[str, ...]]:
    """The class names of each split of ``option`` (``cifar_fs`` or ``fc100``)."""
    if option == "cifar_fs":
        return CIFAR_FS_CLASSES
    return {
        split: tuple(n for n in sorted(fine_names) if coarse_of[n] in FC100_SUPERCLASSES[split])
        for split in SPLITS
    }


def load_cifar_fewshot(
    root: str | Path,
    option: str,
    *,
    download: bool = False,
    image_size: int = _SIDE,
    cache_dir: str | None = None,
) -> dict[str, ClassPool]:
    """The CIFAR-FS or FC100 class pools.

    Args:
        root: folder holding ``cifar-100-python/`` (or ``cifar100/``/``cifar/`` holding it).
        option: ``"cifar_fs"`` or ``"fc100"``.
        download: fetch the official archive when missing.
        image_size: side of the images (resized from 32 when different).
        cache_dir: where the pools are cached (default ``$XDG_CACHE_HOME/metarun``).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassPool` of ``(C, 600, S, S, 3)`` uint8.

    Raises:
        FileNotFoundError: no ``cifar-100-python/`` and ``download=False``.
        ValueError: damaged files, or class names missing from them.
    """
    folder = cifar_folder(Path(root).expanduser(), 100, download=download, meta=True, option=option)
    files = [folder / name for name in ("train", "test", "meta")]

    def decode() -> dict[str, ClassPool]:
        images, fine, coarse, fine_names, _ = read_cifar100(folder)
        coarse_of = {fine_names[int(f)]: int(c) for f, c in zip(fine, coarse, strict=True)}
        position = {name: i for i, name in enumerate(fine_names)}
        pools = {}
        for split, names in split_classes(option, fine_names, coarse_of).items():
            missing = [n for n in names if n not in position]
            if missing:
                raise ValueError(
                    f"{folder / 'meta'} has no classes {missing} of the {option} {split} split: "
                    f"is this CIFAR-100? Fix: replace {folder} with the official files"
                )
            pool = stack_classes(
                images, fine.tolist(), [position[n] for n in names], f"{folder} ({split})"
            )
            c, m = pool.shape[:2]
            pool = resize_images(pool.flatten(0, 1), image_size).view(
                c, m, image_size, image_size, 3
            )
            pools[split] = ClassPool(tuple(names), pool)
        return pools

    return cached_pools(option, f"{fingerprint(files)}|size{image_size}", cache_dir, decode)


@dataclass
class CifarFSConfig(FewShotImageConfig):
    """``dataset=cifar_fs``: N-way K-shot CIFAR-FS (Bertinetto et al. 2019), 64/16/20 classes."""

    root: str = "${oc.env:METARUN_DATA,data}"
    download: bool = False
    image_size: int = _SIDE
    # MetaOptNet's RandomCrop(32, padding=4).
    augment_padding: int = 4
    mean: list[float] = field(default_factory=lambda: list(CIFAR_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR_STD))

    option: ClassVar[str] = "cifar_fs"


@dataclass
class FC100Config(CifarFSConfig):
    """``dataset=fc100``: N-way K-shot FC100 (Oreshkin et al. 2018), 60/20/20 classes."""

    option: ClassVar[str] = "fc100"


def _build(config: CifarFSConfig) -> TaskSources:
    pools = load_cifar_fewshot(
        config.root,
        config.option,
        download=config.download,
        image_size=config.image_size,
        cache_dir=config.cache_dir,
    )
    return image_task_sources(config, pools)


@register("dataset", "cifar_fs", CifarFSConfig)
def build_cifar_fs(config: CifarFSConfig) -> TaskSources:
    return _build(config)


@register("dataset", "fc100", FC100Config)
def build_fc100(config: FC100Config) -> TaskSources:
    return _build(config)
