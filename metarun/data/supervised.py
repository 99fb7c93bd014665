"""What the supervised (example-reweighting) data sets share: the split container and downloads.

Learning to reweight (Ren et al. 2018) trains on a large, biased or noisy pool and meta-learns
example weights against a small clean validation set; :class:`SplitData` holds the three pools.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import tempfile
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

logger = logging.getLogger(__name__)

# Offline machines must fail within this time, not hang: torchvision's downloader opens its
# connections without a timeout, so the process-wide socket default is set around it.
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass
class SplitData:
    """A supervised data set split into a (biased or noisy) training pool, a small clean
    validation set and a test set.

    Images are float32 ``(N, C, H, W)`` in ``[0, 1]`` (raw pixel / 255, no mean/std
    standardisation and no augmentation: those belong to the model or the trainer); labels are
    int64 ``(N,)`` in ``[0, num_classes)``.

    Attributes:
        train_x, train_y: the training pool, as the learner sees it (imbalanced for MNIST, noisy
            labels for CIFAR).
        val_x, val_y: the small CLEAN validation set (the meta-objective of L2RW), disjoint from
            the training pool.
        test_x, test_y: the test set (balanced for MNIST, the official test split for CIFAR).
        num_classes: number of classes.
        train_y_true: CIFAR: the training labels before noise (``train_y != train_y_true`` marks
            the flipped ones); ``None`` when the labels are clean.
        minority_class: MNIST: the label (not the digit) of the minority class.
        background_class: CIFAR background flip: the class every flipped label became.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    train_y_true: Tensor | None = None
    minority_class: int | None = None
    background_class: int | None = None


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the process-wide default socket timeout for the duration of the block."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# What a failed download raises: URLError (no network, DNS), socket timeouts and resets (OSError),
# torchvision's RuntimeError on a checksum mismatch, a truncated HTTP response.
DOWNLOAD_ERRORS = (urllib.error.URLError, OSError, RuntimeError, http.client.HTTPException)


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder inside ``parent`` (same file system, so ``os.replace`` out of it is
    atomic), removed with whatever is left in it."""
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".download.") as tmp:
        yield Path(tmp)


def replace_into(src: Path, dest: Path) -> None:
    """Move a finished file or folder into place (readable by all, unlike temp files)."""
    os.chmod(src, 0o755 if src.is_dir() else 0o644)
    os.replace(src, dest)
    logger.info("wrote %s", dest)
