"""What the supervised (example-reweighting) data sets share: the split container and the task
sources the runner draws from (downloads: :mod:`metarun.data.download`).

Learning to reweight (Ren et al. 2018) trains on a large, biased or noisy pool and meta-learns
example weights against a small clean validation set; :class:`SplitData` holds the three pools,
:class:`ReweightingTasks` turns them into training steps and :class:`ExampleSet` into fixed
evaluation sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.tasks import TaskBatch, TaskSources


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


# ------------------------------------------------------------------------- runner task sources


Augment = Callable[[Tensor, torch.Generator], Tensor]


def crop_flip_offsets(
    n: int, padding: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The random draws of :func:`random_crop_flip` for ``n`` images: row and column offsets
    into the padded image, in ``[0, 2 * padding]``, and whether to mirror."""
    rows = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    cols = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return rows, cols, flip


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int) -> Tensor:
    """Standard CIFAR augmentation, per image: zero-pad by ``padding`` on every side, crop back
    to the original size at a random offset, mirror left-right with probability 1/2.

    Ren et al. 2018's pipeline pads 32x32 images to 36x36 (``padding=2``). Every draw comes from
    ``generator``, so a resumed run sees the same augmented batches.

    Args:
        x: images ``(..., C, H, W)``.
        generator: the task generator.
        padding: pixels of zero padding per side.
    """
    shape = x.shape
    x = x.reshape(-1, *shape[-3:])
    n, _, h, w = x.shape
    dy, dx, flip = crop_flip_offsets(n, padding, generator)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h)  # (n, h)
    cols = dx[:, None] + torch.arange(w)  # (n, w)
    # Mirroring a crop reads its columns in reverse order.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).reshape(shape)  # indexing put channels last


class ReweightingTasks:
    """Training steps of example-reweighting algorithms as one-task :class:`TaskBatch` es: the
    support is a batch of the (biased or noisy) training pool, the query the clean set.

    Args:
        data: the three pools.
        batch_size: training examples per step (drawn without replacement within a step).
        clean_batch_size: clean examples per step (drawn likewise); ``None``: the whole clean
            set, in a fixed order (Ren et al. 2018 on MNIST: all 10).
        augment: applied to the training and the clean batch of every step (Ren et al. 2018
            augment both on CIFAR), with the task generator; evaluation sets never are.

    Raises:
        ValueError: a batch size below 1 or above its pool (naming the config key).

    Example:
        >>> tasks = ReweightingTasks(data, batch_size=100)
        >>> batch = tasks.sample(1, torch.Generator().manual_seed(0))
        >>> batch.support_x.shape, batch.query_x.shape  # (1, 100, 1, 28, 28), (1, 10, 1, 28, 28)
    """

    task_type = "classification"

    def __init__(
        self,
        data: SplitData,
        batch_size: int,
        clean_batch_size: int | None = None,
        augment: Augment | None = None,
    ) -> None:
        n_train, n_clean = len(data.train_y), len(data.val_y)
        if not 1 <= batch_size <= n_train:
            raise ValueError(
                f"dataset.batch_size must be in [1, {n_train}] (the training pool's size), got "
                f"{batch_size}"
            )
        if clean_batch_size is not None and not 1 <= clean_batch_size <= n_clean:
            raise ValueError(
                f"dataset.clean_batch_size must be null or in [1, {n_clean}] (the clean set's "
                f"size), got {clean_batch_size}"
            )
        self.data = data
        self.batch_size = batch_size
        self.clean_batch_size = clean_batch_size
        self.augment = augment

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` steps' worth of batches, drawn with ``generator`` only (exact resume).

        Returns:
            ``support_x (T, B, C, H, W)``, ``support_y (T, B)`` (the labels trained on),
            ``query_x (T, V, C, H, W)``, ``query_y (T, V)`` (clean), and ``support_info (T, B)``
            the true training labels when they differ from the trained ones (noisy CIFAR).
        """
        d = self.data
        index = torch.stack(
            [
                torch.randperm(len(d.train_y), generator=generator)[: self.batch_size]
                for _ in range(num_tasks)
            ]
        )  # (T, B)
        if self.clean_batch_size is None:
            clean = torch.arange(len(d.val_y)).expand(num_tasks, -1)  # (T, V)
        else:
            clean = torch.stack(
                [
                    torch.randperm(len(d.val_y), generator=generator)[: self.clean_batch_size]
                    for _ in range(num_tasks)
                ]
            )
        info = None if d.train_y_true is None else d.train_y_true[index]
        support_x, query_x = d.train_x[index], d.val_x[clean]
        if self.augment is not None:
            support_x = self.augment(support_x, generator)
            query_x = self.augment(query_x, generator)
        return TaskBatch(
            support_x=support_x,
            support_y=d.train_y[index],
            query_x=query_x,
            query_y=d.val_y[clean],
            support_info=info,
        )

    def __repr__(self) -> str:
        return (
            f"ReweightingTasks(train={len(self.data.train_y)}, clean={len(self.data.val_y)}, "
            f"batch_size={self.batch_size}, clean_batch_size={self.clean_batch_size})"
        )


class ExampleSet:
    """A fixed labelled set evaluated example by example (the clean set for validation, the test
    set): :meth:`batches` covers every example once, in order, as one-task batches whose query
    holds up to ``chunk`` examples and whose support is empty.

    Args:
        x: ``(N, C, H, W)`` inputs.
        y: ``(N,)`` int64 labels.
        chunk: examples per batch (memory only; results do not depend on it).
    """

    task_type = "classification"

    def __init__(self, x: Tensor, y: Tensor, chunk: int = 500) -> None:
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"ExampleSet needs as many labels as inputs (> 0), got {len(x)}, {len(y)}"
            )
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.x, self.y, self.chunk = x, y, chunk

    def __len__(self) -> int:
        return len(self.y)

    def _batch(self, index: Tensor) -> TaskBatch:
        x, y = self.x[index].unsqueeze(0), self.y[index].unsqueeze(0)  # (1, Q, ...), (1, Q)
        return TaskBatch(support_x=x[:, :0], support_y=y[:, :0], query_x=x, query_y=y)

    def batches(self) -> Iterator[TaskBatch]:
        """Every example once, in order: ``ceil(N / chunk)`` batches of one task."""
        for start in range(0, len(self), self.chunk):
            yield self._batch(torch.arange(start, min(start + self.chunk, len(self))))

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` tasks of ``min(chunk, N)`` random examples each (the TaskSource
        protocol; evaluation uses :meth:`batches`)."""
        size = min(self.chunk, len(self))
        index = torch.stack(
            [torch.randperm(len(self), generator=generator)[:size] for _ in range(num_tasks)]
        )
        x, y = self.x[index], self.y[index]
        return TaskBatch(support_x=x[:, :0], support_y=y[:, :0], query_x=x, query_y=y)

    def __repr__(self) -> str:
        return f"ExampleSet(n={len(self)}, chunk={self.chunk})"


def reweighting_sources(
    data: SplitData,
    batch_size: int,
    clean_batch_size: int | None,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> TaskSources:
    """Each training step one task whose support is a training batch and whose query is the
    clean set (or a batch of it); validation on the whole clean set, test on the whole test
    set, example by example."""
    return TaskSources(
        train=ReweightingTasks(data, batch_size, clean_batch_size, augment),
        val=ExampleSet(data.val_x, data.val_y),
        test=ExampleSet(data.test_x, data.test_y),
    )
