"""Class-imbalanced binary MNIST (Ren et al. 2018, Sec. 5.1) from the official IDX files.

The official files are gzipped IDX arrays, read here directly (no torchvision dataset object)::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   60,000 training images
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    10,000 test images

(or the same names without ``.gz``, as torchvision leaves them after extracting) in
``<root>/mnist/raw/``, ``<root>/MNIST/raw/`` (torchvision's layout), ``<root>/raw/`` or ``<root>``.
In the test split digit 4 has 982 images and digit 9 has 1,009; in the training split 5,842
and 5,949.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from metarun.data.download import download_file, find_under, not_found_message, root_hint
from metarun.data.supervised import (
    SplitData,
    reweighting_sources,
)
from metarun.registry import register
from metarun.spec.bases import SUPERVISED, DatasetSchema
from metarun.spec.checks import require
from metarun.spec.enums import MnistSourceSplit
from metarun.tasks import TaskSources

__all__ = ["SplitData", "load_mnist_imbalance"]

logger = logging.getLogger(__name__)

SOURCE_SPLITS = ("train", "test")
# Where root may hold the files: torchvision's layout, a data folder's, or root itself.
_SUBDIRS = ("mnist/raw", "MNIST/raw", "raw", "")
_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DOWNLOAD_SUBDIR = "MNIST/raw"  # where torchvision.datasets.MNIST(root) would put them
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes


def _file(folder: Path, stem: str) -> Path | None:
    return next((c for c in (folder / f"{stem}.gz", folder / stem) if c.is_file()), None)


def _find(root: Path, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` files of ``split`` ("train" or "test"), or None."""
    folder = find_under(root, _SUBDIRS, lambda f: all(_file(f, s) for s in _STEMS[split]))
    images, labels = (None, None) if folder is None else (_file(folder, s) for s in _STEMS[split])
    return None if images is None or labels is None else (images, labels)


def _not_found_message(root: Path, split: str) -> str:
    hint = (
        " (only the 10,000-image test split is needed with dataset.source_split=test)"
        if split == "train"
        else ""
    )
    return not_found_message(
        f"MNIST {split} split",
        root,
        _SUBDIRS,
        f"{' and '.join(f'{stem}.gz' for stem in _STEMS[split])} (or the same names without .gz)",
        f"set dataset.root=<folder holding them>, or set dataset.download=true on a machine "
        f"with network{hint}",
    )


def _download(root: Path, split: str) -> None:
    """Fetch the missing files of ``split`` into ``<root>/MNIST/raw/`` (MD5-checked, atomically),
    trying torchvision's mirrors in turn."""
    # Imported here: torchvision.datasets takes about a second to import.
    from torchvision.datasets import MNIST

    md5 = dict(MNIST.resources)
    dest = root / _DOWNLOAD_SUBDIR
    for stem in _STEMS[split]:
        name = f"{stem}.gz"
        if (dest / name).is_file():
            continue
        download_file(
            [f"{mirror}{name}" for mirror in MNIST.mirrors],
            dest / name,
            md5[name],
            where=f"; the files are looked for under {root_hint(root)}",
        )


def _read_idx(path: Path, ndim: int) -> Tensor:
    """One IDX file of unsigned bytes -> uint8 tensor of its shape."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"cannot read {path} ({error}): the file is corrupt or truncated. Fix: delete it and "
            f"set dataset.download=true, or replace it with the official file"
        ) from error
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != bytes([0, 0, _IDX_UBYTE]) or data[3] != ndim:
        raise ValueError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {data[:4].hex()}, "
            f"expected 000008{ndim:02x}). Fix: replace it with the official MNIST file"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(
            f"{path} holds {len(data) - header} bytes of data, its header promises shape {shape} "
            f"({math.prod(shape)} bytes): the file is truncated. Fix: delete it and set "
            f"dataset.download=true, or replace it with the official file"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*shape)


def _load_split(root: Path, split: str, download: bool) -> tuple[Tensor, Tensor]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of the official ``split``."""
    files = _find(root, split)
    if files is None and download:
        _download(root, split)
        files = _find(root, split)
    if files is None:
        raise FileNotFoundError(_not_found_message(root, split))
    images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{files[0]} holds images of shape {tuple(images.shape)} but {files[1]} holds "
            f"{labels.shape[0]} labels (expected (N, 28, 28) and N). Fix: replace both with the "
            f"official MNIST files"
        )
    return images, labels.long()


def _check_arguments(
    pos_ratio: float,
    n_train: int,
    n_val: int,
    n_test: int | None,
    digits: Sequence[int],
    source_split: str,
) -> None:
    if source_split not in SOURCE_SPLITS:
        raise ValueError(
            f"dataset.source_split must be one of {', '.join(SOURCE_SPLITS)}, got {source_split!r}"
        )
    if not 0.5 <= pos_ratio < 1.0:
        raise ValueError(
            f"dataset.pos_ratio must be in [0.5, 1) (the fraction of the dominant digit in the "
            f"training pool), got {pos_ratio} (set e.g. dataset.pos_ratio=0.995)"
        )
    if n_train < 1:
        raise ValueError(f"dataset.n_train must be >= 1, got {n_train} (set e.g. 5000)")
    if n_val < 2 or n_val % 2:
        raise ValueError(
            f"dataset.n_val must be an even number >= 2 (a balanced validation set: n_val/2 "
            f"images per digit), got {n_val} (set e.g. dataset.n_val=10)"
        )
    if n_test is not None and (n_test < 2 or n_test % 2):
        raise ValueError(
            f"dataset.n_test must be null (the largest balanced test set) or an even number >= 2 "
            f"(n_test/2 images per digit), got {n_test}"
        )
    if len(digits) != 2 or digits[0] == digits[1] or any(not 0 <= d <= 9 for d in digits):
        raise ValueError(
            f"dataset.digits must be two different digits 0..9 (minority, dominant), got "
            f"{tuple(digits)} (set e.g. dataset.digits=[4,9])"
        )


def _train_counts(n_train: int, pos_ratio: float) -> tuple[int, int]:
    """``(minority, dominant)`` images in a training pool of ``n_train``."""
    dominant = round(pos_ratio * n_train)
    return n_train - dominant, dominant


def _fits(
    n_train: int,
    pos_ratio: float,
    per_val: int,
    per_test: int,
    available: tuple[int, int],
    shared: bool,
) -> bool:
    """Whether the training pool, the validation set and (when they share the source split)
    ``per_test`` test images per digit fit in the ``(minority, dominant)`` images available."""
    need = _train_counts(n_train, pos_ratio)
    extra = per_val + (per_test if shared else 0)
    return all(n + extra <= a for n, a in zip(need, available))


def _largest_n_train(
    limit: int,
    pos_ratio: float,
    per_val: int,
    per_test: int,
    available: tuple[int, int],
    shared: bool,
) -> int | None:
    # Both class counts are non-decreasing in n_train, so the first fit going down is the largest.
    for n in range(limit, 0, -1):
        if _fits(n, pos_ratio, per_val, per_test, available, shared):
            return n
    return None


def _plan(
    n_train: int,
    pos_ratio: float,
    n_val: int,
    n_test: int | None,
    digits: Sequence[int],
    source_split: str,
    available: tuple[int, int],
    test_available: tuple[int, int],
) -> tuple[tuple[int, int], int, int]:
    """``((minority, dominant) training images, val per digit, test per digit)``, or a
    ValueError saying what does not fit."""
    shared = source_split == "test"
    per_val = n_val // 2
    train_min, train_dom = _train_counts(n_train, pos_ratio)
    if train_min < 1:
        smallest = next(n for n in range(n_train + 1, 10**9) if _train_counts(n, pos_ratio)[0])
        raise ValueError(
            f"dataset.n_train={n_train} at dataset.pos_ratio={pos_ratio} leaves no image of the "
            f"minority digit {digits[0]} in the training pool (round({pos_ratio} * {n_train}) = "
            f"{train_dom} images of digit {digits[1]}). Fix: set dataset.n_train>={smallest} or "
            f"lower dataset.pos_ratio"
        )
    source = f"the MNIST {source_split} split"
    if not shared and n_test is not None and n_test // 2 > min(test_available):
        raise ValueError(
            f"dataset.n_test={n_test} needs {n_test // 2} test images of each digit but the MNIST "
            f"test split has {test_available[0]} of digit {digits[0]} and {test_available[1]} of "
            f"digit {digits[1]}. Fix: set dataset.n_test<={2 * min(test_available)} or "
            f"dataset.n_test=null"
        )
    # Sharing the source split, the test set needs at least one image of each digit left over.
    per_test_min = n_test // 2 if n_test is not None else 1
    if not _fits(n_train, pos_ratio, per_val, per_test_min, available, shared):
        largest = _largest_n_train(n_train, pos_ratio, per_val, per_test_min, available, shared)
        test_part = (
            f" + {per_test_min} (test{', at least' if n_test is None else ''})" if shared else ""
        )
        needs = "; ".join(
            f"{train} (train) + {per_val} (val){test_part} = "
            f"{train + per_val + (per_test_min if shared else 0)} of digit {digit}, "
            f"{have} available"
            for train, digit, have in zip((train_min, train_dom), digits, available)
        )
        test_setting = "null" if n_test is None else n_test
        settings = f"dataset.n_val={n_val}" + (f", dataset.n_test={test_setting}" if shared else "")
        fix = (
            f"the largest dataset.n_train that works with these settings ({settings}) is {largest}"
            if largest is not None
            else f"no dataset.n_train works with {settings}: lower them"
        )
        if largest is not None and shared and n_test is None:
            left = min(
                a - t - per_val for a, t in zip(available, _train_counts(largest, pos_ratio))
            )
            fix += f" (leaving a test set of {2 * left}: set dataset.n_test to reserve more)"
        alternative = (
            "use dataset.source_split=train (the 60,000-image training file)"
            if shared
            else "lower dataset.pos_ratio"
        )
        raise ValueError(
            f"dataset.source_split={source_split}, dataset.pos_ratio={pos_ratio}, "
            f"dataset.n_train={n_train} do not fit in {source}: needed {needs}. Fix: {fix}; or "
            f"{alternative}"
        )
    if n_test is not None:
        per_test = n_test // 2
    elif shared:
        per_test = min(a - t - per_val for a, t in zip(available, (train_min, train_dom)))
    else:
        per_test = min(test_available)
    return (train_min, train_dom), per_val, per_test


def _take(
    images: Tensor,
    labels: Tensor,
    parts: Sequence[Tensor],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Images of ``parts[k]`` (indices) get label ``k``; shuffled so the classes are mixed."""
    index = torch.cat(list(parts))
    target = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)])
    order = torch.randperm(len(index), generator=generator)
    x = images[index[order]].unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28) in [0, 1]
    return x, target[order]


def load_mnist_imbalance(
    root: str | Path,
    *,
    pos_ratio: float = 0.995,
    n_train: int = 5000,
    n_val: int = 10,
    n_test: int | None = None,
    digits: Sequence[int] = (4, 9),
    source_split: str = "train",
    seed: int = 0,
    download: bool = False,
) -> SplitData:
    """Binary, class-imbalanced MNIST: a training pool dominated by one digit, a small balanced
    clean validation set, and a balanced test set.

    Following Ren et al. (2018, Sec. 5.1), digit ``digits[1]`` (9) dominates the training pool
    and ``digits[0]`` (4) is the minority; the labels are binary: ``digits[0] -> 0`` and
    ``digits[1] -> 1``. The three pools are disjoint and each is shuffled. Each digit's images
    are permuted with ``torch.Generator().manual_seed(seed)`` and taken in order: validation
    first, then training, then (``source_split="test"``) test.

    Differences from the official code (``mnist/mnist_train.py``), which carves the validation
    images out of the ``n_train`` and rounds the class counts down: here the training pool has
    exactly ``n_train`` images, ``round(pos_ratio * n_train)`` of them of the dominant digit, and
    the ``n_val`` validation images come on top.

    Args:
        root: folder holding the IDX files (see the module docstring for where).
        pos_ratio: fraction of the dominant digit in the training pool, in ``[0.5, 1)`` (the
            paper sweeps 0.9 .. 0.995).
        n_train: size of the training pool.
        n_val: size of the balanced clean validation set (``n_val / 2`` per digit), taken from
            the same split as the training pool.
        n_test: size of the balanced test set; ``None``: the largest the remaining images allow.
        digits: ``(minority, dominant)`` digits.
        source_split: ``"train"``: training pool and validation set from the 60,000 training
            images, test set from the 10,000 test images. ``"test"``: all three from the test
            images only (for machines with just that file).
        seed: seed of the selection and shuffles.
        download: fetch the missing files of the splits needed into ``<root>/MNIST/raw/``
            (MD5-checked; fails within ``DOWNLOAD_TIMEOUT_S`` when offline).

    Returns:
        :class:`SplitData` with ``(N, 1, 28, 28)`` float32 images in ``[0, 1]``, int64 labels in
        ``{0, 1}``, ``num_classes=2`` and ``minority_class=0``.

    Raises:
        FileNotFoundError: the files of a needed split are missing and ``download=False``.
        DownloadError: ``download=True`` but the download failed (also a ValueError).
        ValueError: bad arguments; a corrupt file; or more images asked for than the split holds
            (the message gives the numbers and the largest ``dataset.n_train`` that fits).

    References:
        Ren, Zeng, Yang, Urtasun. Learning to Reweight Examples for Robust Deep Learning.
        ICML 2018, Sec. 5.1.

    Example:
        >>> data = load_mnist_imbalance("data", source_split="test", n_train=1000)
        >>> data.train_x.shape, int(data.train_y.sum())
        (torch.Size([1000, 1, 28, 28]), 995)
    """
    _check_arguments(pos_ratio, n_train, n_val, n_test, digits, source_split)
    root = Path(root).expanduser()
    shared = source_split == "test"
    images, labels = _load_split(root, source_split, download)
    test_images, test_labels = (images, labels) if shared else _load_split(root, "test", download)

    def count(y: Tensor) -> tuple[int, int]:
        return int((y == digits[0]).sum()), int((y == digits[1]).sum())

    (train_min, train_dom), per_val, per_test = _plan(
        n_train, pos_ratio, n_val, n_test, digits, source_split, count(labels), count(test_labels)
    )

    generator = torch.Generator().manual_seed(seed)
    val_parts, train_parts, test_parts = [], [], []
    for digit, n in zip(digits, (train_min, train_dom)):
        index = (labels == digit).nonzero().squeeze(1)
        index = index[torch.randperm(len(index), generator=generator)]
        val_parts.append(index[:per_val])
        train_parts.append(index[per_val : per_val + n])
        if shared:
            test_parts.append(index[per_val + n : per_val + n + per_test])
    if not shared:
        for digit in digits:
            index = (test_labels == digit).nonzero().squeeze(1)
            test_parts.append(index[torch.randperm(len(index), generator=generator)][:per_test])

    train_x, train_y = _take(images, labels, train_parts, generator)
    val_x, val_y = _take(images, labels, val_parts, generator)
    test_x, test_y = _take(test_images, test_labels, test_parts, generator)
    logger.info(
        "MNIST %d-vs-%d from the %s split: train %d (%d + %d), val %d, test %d",
        digits[0],
        digits[1],
        source_split,
        len(train_y),
        train_min,
        train_dom,
        len(val_y),
        len(test_y),
    )
    return SplitData(
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=2,
        minority_class=0,
    )


@dataclass
class MnistImbalanceConfig(DatasetSchema):
    """``dataset=mnist_imbalance``: binary 4-vs-9 MNIST with a training pool dominated by the 9s,
    a small balanced clean set and a balanced test set (Ren et al. 2018, Sec. 5.1)."""

    root: str = "${oc.env:METARUN_DATA,data}"  # holds mnist/raw/ (or MNIST/raw/) IDX files
    pos_ratio: float = 0.995  # fraction of the dominant digit in the training pool
    n_train: int = 5000
    n_val: int = 10  # clean set, n_val/2 per digit: L2RW's meta-objective (query each step)
    n_test: int | None = 500  # balanced; null = the largest the remaining images allow
    digits: list[int] = field(default_factory=lambda: [4, 9])  # (minority, dominant)
    # test: everything from the 10,000 test images (machines without the training file).
    source_split: MnistSourceSplit = MnistSourceSplit.train
    download: bool = False
    seed: int = 0  # which images land in which pool (not the training seed)
    batch_size: int = 100  # training examples per step

    task_kind: ClassVar[str] = SUPERVISED
    models: ClassVar[tuple[str, ...]] = ("lenet",)
    # Label 0 is the minority digit (load_mnist_imbalance): reweighting logs its weight mass.
    minority_class: ClassVar[int | None] = 0

    def __post_init__(self) -> None:
        require(
            0.5 <= self.pos_ratio < 1.0,
            "dataset.pos_ratio",
            self.pos_ratio,
            "in [0.5, 1)",
            "dataset.pos_ratio=0.995",
        )
        require(self.n_train >= 1, "dataset.n_train", self.n_train, ">= 1", "dataset.n_train=5000")
        require(
            self.n_val >= 2 and self.n_val % 2 == 0,
            "dataset.n_val",
            self.n_val,
            "an even number >= 2 (n_val/2 images per digit)",
            "dataset.n_val=10",
        )
        require(
            self.n_test is None or (self.n_test >= 2 and self.n_test % 2 == 0),
            "dataset.n_test",
            self.n_test,
            "null or an even number >= 2 (n_test/2 images per digit)",
            "dataset.n_test=500",
        )
        require(
            len(self.digits) == 2
            and self.digits[0] != self.digits[1]
            and all(0 <= d <= 9 for d in self.digits),
            "dataset.digits",
            list(self.digits),
            "two different digits 0..9 (minority, dominant)",
            "dataset.digits=[4,9]",
        )
        require(
            1 <= self.batch_size <= self.n_train,
            "dataset.batch_size",
            self.batch_size,
            f"in [1, dataset.n_train={self.n_train}]",
            "dataset.batch_size=100",
        )

    def check_model(self, model: Any) -> None:
        for key, value in (("num_classes", 2), ("in_channels", 1), ("image_size", 28)):
            require(
                getattr(model, key) == value,
                f"model.{key}",
                getattr(model, key),
                f"{value} for dataset=mnist_imbalance",
                f"model.{key}={value}",
            )

    def shard_sizes(self) -> dict[str, int]:
        # The clean batch is the whole clean set (n_val) each step.
        return {"dataset.batch_size": self.batch_size, "dataset.n_val": self.n_val}


@register("dataset", "mnist_imbalance", MnistImbalanceConfig)
def build_mnist_imbalance(config: MnistImbalanceConfig) -> TaskSources:
    data = load_mnist_imbalance(
        config.root,
        pos_ratio=config.pos_ratio,
        n_train=config.n_train,
        n_val=config.n_val,
        n_test=config.n_test,
        digits=tuple(config.digits),
        source_split=config.source_split.value,
        seed=config.seed,
        download=config.download,
    )
    # Ren et al. 2018 (official code): the clean batch is min(batch size, n_val) = all 10.
    return reweighting_sources(data, config.batch_size, clean_batch_size=None)
