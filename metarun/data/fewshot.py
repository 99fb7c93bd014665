"""N-way K-shot classification tasks drawn from a pool of images per class, and fixed eval tasks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from metarun.data.supervised import random_crop_flip
from metarun.tasks import TaskBatch


class TaskSource(Protocol):
    """Anything that draws a batch of tasks from an explicit generator."""

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch: ...


def _random_permutations(rows: tuple[int, ...], n: int, generator: torch.Generator) -> Tensor:
    """Independent uniform permutations of ``range(n)``, one per row: ``(*rows, n)`` int64.

    float64 keys make ties (which would only bias the order slightly) practically impossible.
    """
    keys = torch.rand((*rows, n), generator=generator, dtype=torch.float64)
    return keys.argsort(dim=-1)


class FewShotTasks:
    """N-way K-shot tasks: ``n_way`` distinct classes, ``k_shot + k_query`` distinct examples each.

    Each task relabels its classes ``0..n_way-1`` in a random order, and shuffles the order of its
    support and of its query examples (so no algorithm can rely on labels being grouped).

    A float pool is indexed as it is. A uint8 pool ``(C, M, H, W, channels)`` (RGB images as
    decoded: 84x84 miniImageNet takes 1.3 GB for 60,000 images instead of 5 GB in float32) is
    converted only for the sampled images: to float in ``[0, 1]``, channels first, optionally
    augmented (random crop with zero padding + horizontal flip, drawn from the task generator, so
    a resumed run sees the same tasks), then normalised by ``mean`` and ``std``.

    Args:
        pool: ``(C, M, *image_shape)`` ``M`` examples for each of ``C`` classes; float, or uint8
            channels-last ``(C, M, H, W, channels)``.
        n_way: classes per task.
        k_shot: support examples per class.
        k_query: query examples per class.
        mean: per-channel mean subtracted from uint8 pools' images in ``[0, 1]`` (default 0).
        std: per-channel standard deviation they are divided by (default 1).
        augment_padding: pixels of zero padding of the random crop (with a random horizontal
            flip); 0: no augmentation. Meant for training tasks only.
        offsets: for classes with different numbers of examples (tieredImageNet: 732 to 1300
            images): ``pool`` is then ``(N, *image_shape)`` with the examples of class ``c`` in
            rows ``offsets[c]:offsets[c + 1]`` (``(C + 1,)`` int64, from 0 to N).

    Raises:
        ValueError: ``n_way`` above ``C``, ``k_shot + k_query`` above ``M``, a count below 1, a
            uint8 pool not of shape ``(C, M, H, W, channels)``, or a mean/std of the wrong length.

    Example:
        >>> pool = torch.rand(20, 20, 1, 28, 28)
        >>> tasks = FewShotTasks(pool, n_way=5, k_shot=1, k_query=15)
        >>> batch = tasks.sample(8, torch.Generator().manual_seed(0))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([8, 5, 1, 28, 28]), torch.Size([8, 75]))
    """

    task_type = "classification"

    def __init__(
        self,
        pool: Tensor,
        n_way: int,
        k_shot: int,
        k_query: int,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment_padding: int = 0,
        offsets: Tensor | None = None,
    ) -> None:
        self.offsets = offsets
        if offsets is not None:
            counts = offsets.diff()
            if offsets.dim() != 1 or len(offsets) < 2 or int(offsets[0]) != 0:
                raise ValueError(f"offsets must be (C + 1,) from 0, got {offsets.tolist()[:5]}")
            if int(offsets[-1]) != pool.shape[0] or bool((counts < 1).any()):
                raise ValueError(
                    f"offsets must rise from 0 to the {pool.shape[0]} examples of the pool, "
                    f"every class holding at least one, got {offsets.tolist()[:5]}..."
                )
            num_classes, per_class = len(counts), int(counts.min())
            self.counts = counts
            # A zero-stride view of the shape a regular pool would have: the checks below.
            shaped = pool[:1].expand(num_classes, per_class, *pool.shape[1:])
        else:
            shaped = pool
        if shaped.dim() < 2:
            raise ValueError(
                f"pool must be (classes, examples, *input_shape), got shape {tuple(pool.shape)}"
            )
        num_classes, per_class = int(shaped.shape[0]), int(shaped.shape[1])
        for key, value in (
            ("dataset.n_way", n_way),
            ("dataset.k_shot", k_shot),
            ("dataset.k_query", k_query),
        ):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if n_way > num_classes:
            raise ValueError(
                f"dataset.n_way={n_way} exceeds the {num_classes} classes available in this split "
                f"(set dataset.n_way <= {num_classes})"
            )
        if k_shot + k_query > per_class:
            raise ValueError(
                f"dataset.k_shot + dataset.k_query = {k_shot} + {k_query} = {k_shot + k_query} "
                f"exceeds the {per_class} examples available per class "
                f"(lower dataset.k_shot or dataset.k_query)"
            )
        if augment_padding < 0:
            raise ValueError(f"augment_padding must be >= 0, got {augment_padding}")
        self.pool = pool
        self.n_way = int(n_way)
        self.k_shot = int(k_shot)
        self.k_query = int(k_query)
        self.num_outputs = self.n_way
        self.augment_padding = int(augment_padding)
        self.is_uint8 = pool.dtype == torch.uint8
        if self.is_uint8:
            if shaped.dim() != 5:
                raise ValueError(
                    f"a uint8 pool must be (classes, examples, H, W, channels), got shape "
                    f"{tuple(shaped.shape)}"
                )
            channels = int(shaped.shape[-1])
            self.input_shape: tuple[int, ...] = (
                channels,
                int(shaped.shape[2]),
                int(shaped.shape[3]),
            )
            self.mean = self._per_channel("mean", mean, 0.0, channels)
            self.std = self._per_channel("std", std, 1.0, channels)
            if bool((self.std <= 0).any()):
                raise ValueError(f"std must be > 0 per channel, got {self.std.flatten().tolist()}")
        else:
            if mean is not None or std is not None:
                raise ValueError("mean and std normalise uint8 pools only; this pool is float")
            self.input_shape = tuple(int(d) for d in shaped.shape[2:])
        self.num_classes, self.per_class = num_classes, per_class

    @staticmethod
    def _per_channel(
        name: str, value: Sequence[float] | None, default: float, channels: int
    ) -> Tensor:
        values = [default] * channels if value is None else [float(v) for v in value]
        if len(values) != channels:
            raise ValueError(
                f"{name} needs one value per channel ({channels}), got {values} (set e.g. "
                f"dataset.{name}=[{', '.join([str(default)] * channels)}])"
            )
        return torch.tensor(values).view(channels, 1, 1)

    def _to_inputs(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Sampled images ``(..., H, W, ch)`` uint8 -> normalised ``(..., ch, H, W)`` float32."""
        x = x.movedim(-1, -3).float().div_(255.0)  # (..., ch, H, W) in [0, 1]
        if self.augment_padding:
            # Padding with 0 before normalising pads with black, as torchvision's RandomCrop does
            # on the PIL images of the MetaOptNet and ProtoNets pipelines.
            x = random_crop_flip(x, generator, self.augment_padding)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``batch_size`` tasks using only ``generator`` (a CPU generator) for randomness.

        Returns:
            A :class:`TaskBatch` on ``pool``'s device: ``support_x (T, N*K, *input_shape)``,
            ``support_y (T, N*K)`` int64, ``query_x (T, N*Q, *input_shape)``, ``query_y (T, N*Q)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        t, n, k, q = batch_size, self.n_way, self.k_shot, self.k_query
        # The first n classes of a random permutation, in random order: label i <- classes[:, i].
        classes = _random_permutations((t,), self.num_classes, generator)[:, :n]  # (T, N)
        if self.offsets is None:
            examples = _random_permutations((t, n), self.per_class, generator)[:, :, : k + q]
        else:
            # Uniform keys, 2 (above any key) past a class's own count: the first k + q of the
            # argsort are distinct examples drawn uniformly from that class.
            counts = self.counts[classes]  # (T, N)
            keys = torch.rand(
                (t, n, int(self.counts.max())), generator=generator, dtype=torch.float64
            )
            keys[torch.arange(keys.shape[-1]) >= counts.unsqueeze(-1)] = 2.0
            examples = keys.argsort(dim=-1)[:, :, : k + q]  # (T, N, K+Q)
        support_order = _random_permutations((t,), n * k, generator)  # (T, N*K)
        query_order = _random_permutations((t,), n * q, generator)  # (T, N*Q)

        device = self.pool.device
        if self.offsets is None:
            x = self.pool[classes.unsqueeze(-1).to(device), examples.to(device)]  # (T, N, K+Q, *in)
        else:
            rows_of = self.offsets[classes].unsqueeze(-1) + examples  # (T, N, K+Q)
            x = self.pool[rows_of.to(device)]
        if self.is_uint8:
            x = self._to_inputs(x, generator)
        elif self.augment_padding:
            x = random_crop_flip(x, generator, self.augment_padding)
        y = torch.arange(n, device=device).view(1, n, 1).expand(t, n, k + q)  # (T, N, K+Q)
        rows = torch.arange(t, device=device).unsqueeze(-1)  # (T, 1)

        def flat(part: Tensor, order: Tensor) -> Tensor:
            part = part.reshape(t, -1, *part.shape[3:])  # (T, N*K, ...) class-major
            return part[rows, order.to(device)]

        return TaskBatch(
            support_x=flat(x[:, :, :k], support_order),
            support_y=flat(y[:, :, :k], support_order),
            query_x=flat(x[:, :, k:], query_order),
            query_y=flat(y[:, :, k:], query_order),
        )

    def __repr__(self) -> str:
        return (
            f"FewShotTasks(classes={self.num_classes}, per_class={self.per_class}, "
            f"n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query}, "
            f"dtype={self.pool.dtype}, augment_padding={self.augment_padding})"
        )


def fixed_tasks(
    source: TaskSource, num_tasks: int, batch_size: int, seed: int
) -> Iterator[TaskBatch]:
    """Deterministic evaluation tasks: the same ``seed`` gives identical tasks on every call.

    Task ``i`` is drawn from its own generator, seeded from ``seed`` and ``i``, so the tasks depend
    neither on the global RNG nor on ``batch_size`` (only the grouping into batches does).

    Args:
        source: anything with ``sample(batch_size, generator) -> TaskBatch``.
        num_tasks: total number of tasks.
        batch_size: tasks per yielded batch; the last batch may be smaller.
        seed: the evaluation seed.

    Yields:
        ``ceil(num_tasks / batch_size)`` :class:`TaskBatch` es.
    """
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = torch.randint(
        0, 2**62, (num_tasks,), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    for start in range(0, num_tasks, batch_size):
        tasks = [
            source.sample(1, torch.Generator().manual_seed(s))
            for s in seeds[start : start + batch_size]
        ]
        yield TaskBatch(
            *(torch.cat(parts) for parts in zip(*(b.tensors() for b in tasks), strict=True))
        )
