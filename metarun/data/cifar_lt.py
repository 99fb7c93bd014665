"""Long-tailed CIFAR-10/100 (Cui et al. 2019) with a small balanced clean set, as used by
Meta-Weight-Net (Shu et al. 2019, Sec. 5.1) for class imbalance.

From the official training batches (files: :mod:`metarun.data.cifar`): first ``n_clean_per_class``
images of every class are set aside with their labels as the clean (meta) set, then class ``i``
of the rest keeps ``n_i = floor(n_max * (1 / imbalance) ** (i / (C - 1)))`` images, where
``n_max`` is the smallest number left in a class (4,990 on CIFAR-10 with 10 clean images per
class, as the official code's ``(50000 - num_meta) / C``). Class 0 is the head, class ``C - 1``
the tail, with ``n_max / n_{C-1}`` the imbalance factor (10, 50, 100, 200 in the papers). The
test set is the official, balanced one.

References:
    Cui, Jia, Lin, Song & Belongie, "Class-Balanced Loss Based on Effective Number of
    Samples", CVPR 2019 (the exponential profile).
    Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting",
    NeurIPS 2019, Sec. 5.1 and Table 1; official code xjtushujun/Meta-weight-net_class-imbalance
    (``get_img_num_per_cls``: the same counts, 10 clean images per class).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from metarun.data.cifar import (
    _LAYOUT,
    _clean_split,
    _read_split,
    _to_float,
    check_cifar_batches,
    check_num_classes,
    check_option_classes,
    cifar_folder,
    cifar_sources,
)
from metarun.data.supervised import SplitData
from metarun.registry import register
from metarun.spec.bases import SUPERVISED, DatasetSchema
from metarun.spec.checks import require
from metarun.tasks import TaskSources

__all__ = ["load_cifar_lt", "long_tail_counts"]

logger = logging.getLogger(__name__)


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images per class of the exponential profile (Cui et al. 2019):
    ``floor(n_max * (1 / imbalance) ** (i / (C - 1)))`` for class ``i``.

    Args:
        n_max: images of the head class (class 0).
        num_classes: ``C >= 2``.
        imbalance: head over tail, ``>= 1`` (1: balanced).

    Raises:
        ValueError: ``imbalance < 1``, fewer than 2 classes, ``n_max < 1``.

    Example:
        >>> long_tail_counts(4990, 10, 100)[:3], long_tail_counts(4990, 10, 100)[-1]
        ([4990, 2998, 1801], 49)
    """
    if num_classes < 2:
        raise ValueError(f"a long tail needs num_classes >= 2, got {num_classes}")
    if not imbalance >= 1:
        raise ValueError(
            f"dataset.imbalance must be >= 1 (head-class over tail-class images), got "
            f"{imbalance} (set e.g. dataset.imbalance=100)"
        )
    if n_max < 1:
        raise ValueError(f"the head class needs at least one image, got n_max={n_max}")
    # floor as the official code's int(); a tiny epsilon so that exact products (the head,
    # imbalance 1) are not lost to rounding below the integer.
    return [
        int(math.floor(n_max * (1.0 / imbalance) ** (i / (num_classes - 1)) + 1e-9))
        for i in range(num_classes)
    ]


def load_cifar_lt(
    root: str | Path,
    *,
    num_classes: int = 10,
    imbalance: float = 100.0,
    n_clean_per_class: int = 10,
    seed: int = 0,
    download: bool = False,
) -> SplitData:
    """Long-tailed CIFAR-10/100 training pool, balanced clean set, official test set.

    Randomness (which images are clean, which are kept in each class) comes from one
    ``torch.Generator().manual_seed(seed)``: clean split first, then the per-class subsets.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or ``cifar-100-python/``), also looked for
            in ``<root>/cifar10`` (``cifar100``) and ``<root>/cifar``.
        num_classes: 10 or 100.
        imbalance: head over tail images (the imbalance factor), ``>= 1``.
        n_clean_per_class: clean images per class taken out first (the official code: 10).
        seed: seed of the clean split and the subsets.
        download: fetch the official archive when missing (MD5-checked).

    Returns:
        :class:`SplitData`: ``(N, 3, 32, 32)`` float32 images in ``[0, 1]``; ``train_*`` the
        long-tailed pool, ``val_*`` the balanced clean set, ``test_*`` the official test set.

    Raises:
        FileNotFoundError: the files are missing and ``download=False``.
        ValueError: bad arguments, or a class too small for the clean set.
    """
    if num_classes not in _LAYOUT:
        raise ValueError(
            f"dataset.num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}"
        )
    if n_clean_per_class < 1:
        raise ValueError(
            f"dataset.n_clean_per_class must be >= 1, got {n_clean_per_class} (set e.g. 10)"
        )
    folder = cifar_folder(Path(root).expanduser(), num_classes, download=download)
    images, labels = _read_split(folder, num_classes, "train")
    test_images, test_labels = _read_split(folder, num_classes, "test")

    generator = torch.Generator().manual_seed(seed)
    try:
        clean, rest = _clean_split(labels, n_clean_per_class * num_classes, num_classes, generator)
    except ValueError as error:
        raise ValueError(
            str(error).replace("dataset.n_clean", "dataset.n_clean_per_class x num_classes")
        ) from None
    rest_labels = labels[rest]
    left = torch.bincount(rest_labels, minlength=num_classes)
    counts = long_tail_counts(int(left.min()), num_classes, imbalance)
    kept: list[Tensor] = []
    for c, n in enumerate(counts):
        members = rest[rest_labels == c]
        order = torch.randperm(len(members), generator=generator)[:n]
        kept.append(members[order])
    train = torch.cat(kept).sort().values
    logger.info(
        "CIFAR-%d long-tailed (imbalance %g): %d training images (%d .. %d per class), %d "
        "clean, %d test",
        num_classes,
        imbalance,
        len(train),
        counts[0],
        counts[-1],
        len(clean),
        len(test_labels),
    )
    return SplitData(
        train_x=_to_float(images[train]),
        train_y=labels[train],
        val_x=_to_float(images[clean]),
        val_y=labels[clean],
        test_x=_to_float(test_images),
        test_y=test_labels,
        num_classes=num_classes,
    )


@dataclass
class Cifar10LTConfig(DatasetSchema):
    """``dataset=cifar10_lt``: long-tailed CIFAR-10 (Cui et al. 2019's exponential profile) and
    a balanced clean set taken out of the training images first (Shu et al. 2019, Sec. 5.1)."""

    root: str = "${oc.env:METARUN_DATA,data}"  # holds cifar-10-batches-py/ (or cifar10/...)
    num_classes: int = 10  # fixed by the option: 10 here, 100 for dataset=cifar100_lt
    imbalance: float = 100.0  # head-class over tail-class images (the papers: 10, 50, 100, 200)
    n_clean_per_class: int = 10  # balanced clean set (the official code's num_meta)
    download: bool = False
    seed: int = 0  # clean split and subsets (not the training seed)
    batch_size: int = 100  # training examples per step
    # Clean examples per step (the official code: batches of 100); null = the whole clean set.
    clean_batch_size: int | None = 100
    # Random crops after padding, and left-right mirroring, of the training and clean batches;
    # validation and test images never. (The official code pads 4 pixels by reflection; here
    # zero padding, as dataset=cifar10_noisy.)
    augment: bool = True
    crop_padding: int = 4  # pixels per side

    task_kind: ClassVar[str] = SUPERVISED
    models: ClassVar[tuple[str, ...]] = ("resnet32", "wrn28_10")
    _classes: ClassVar[int] = 10

    def __post_init__(self) -> None:
        check_option_classes(self.num_classes, self._classes, "lt")
        require(
            self.imbalance >= 1,
            "dataset.imbalance",
            self.imbalance,
            ">= 1 (head-class over tail-class images; 1 = balanced)",
            "dataset.imbalance=100",
        )
        require(
            self.n_clean_per_class >= 1,
            "dataset.n_clean_per_class",
            self.n_clean_per_class,
            ">= 1",
            "dataset.n_clean_per_class=10",
        )
        check_cifar_batches(
            self, f"dataset.n_clean_per_class x num_classes = {self.n_clean} clean images"
        )

    @property
    def n_clean(self) -> int:
        """Size of the clean set."""
        return self.n_clean_per_class * self.num_classes

    def check_model(self, model: Any) -> None:
        check_num_classes(model, self.num_classes)

    def shard_sizes(self) -> dict[str, int]:
        if self.clean_batch_size is None:  # the whole clean set each step
            return {
                "dataset.batch_size": self.batch_size,
                "dataset.n_clean_per_class x num_classes": self.n_clean,
            }
        return {
            "dataset.batch_size": self.batch_size,
            "dataset.clean_batch_size": self.clean_batch_size,
        }


@dataclass
class Cifar100LTConfig(Cifar10LTConfig):
    """``dataset=cifar100_lt``: long-tailed CIFAR-100 (fine labels), otherwise as
    ``cifar10_lt``."""

    num_classes: int = 100

    _classes: ClassVar[int] = 100


@register("dataset", "cifar100_lt", Cifar100LTConfig)
@register("dataset", "cifar10_lt", Cifar10LTConfig)
def build_cifar_lt(config: Cifar10LTConfig) -> TaskSources:
    data = load_cifar_lt(
        config.root,
        num_classes=config.num_classes,
        imbalance=config.imbalance,
        n_clean_per_class=config.n_clean_per_class,
        seed=config.seed,
        download=config.download,
    )
    return cifar_sources(config, data)
