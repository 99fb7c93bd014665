"""N-way K-shot classification tasks drawn from a pool of images per class, and fixed eval tasks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

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

    Args:
        pool: ``(C, M, *image_shape)`` ``M`` examples for each of ``C`` classes.
        n_way: classes per task.
        k_shot: support examples per class.
        k_query: query examples per class.

    Raises:
        ValueError: ``n_way`` above ``C``, ``k_shot + k_query`` above ``M``, or a count below 1.

    Example:
        >>> pool = torch.rand(20, 20, 1, 28, 28)
        >>> tasks = FewShotTasks(pool, n_way=5, k_shot=1, k_query=15)
        >>> batch = tasks.sample(8, torch.Generator().manual_seed(0))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([8, 5, 1, 28, 28]), torch.Size([8, 75]))
    """

    task_type = "classification"

    def __init__(self, pool: Tensor, n_way: int, k_shot: int, k_query: int) -> None:
        if pool.dim() < 2:
            raise ValueError(
                f"pool must be (classes, examples, *input_shape), got shape {tuple(pool.shape)}"
            )
        num_classes, per_class = int(pool.shape[0]), int(pool.shape[1])
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
        self.pool = pool
        self.n_way = int(n_way)
        self.k_shot = int(k_shot)
        self.k_query = int(k_query)
        self.num_outputs = self.n_way
        self.input_shape = tuple(int(d) for d in pool.shape[2:])

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``batch_size`` tasks using only ``generator`` (a CPU generator) for randomness.

        Returns:
            A :class:`TaskBatch` on ``pool``'s device: ``support_x (T, N*K, *input_shape)``,
            ``support_y (T, N*K)`` int64, ``query_x (T, N*Q, *input_shape)``, ``query_y (T, N*Q)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        t, n, k, q = batch_size, self.n_way, self.k_shot, self.k_query
        num_classes, per_class = self.pool.shape[:2]
        # The first n classes of a random permutation, in random order: label i <- classes[:, i].
        classes = _random_permutations((t,), num_classes, generator)[:, :n]  # (T, N)
        examples = _random_permutations((t, n), per_class, generator)[:, :, : k + q]  # (T, N, K+Q)
        support_order = _random_permutations((t,), n * k, generator)  # (T, N*K)
        query_order = _random_permutations((t,), n * q, generator)  # (T, N*Q)

        device = self.pool.device
        x = self.pool[classes.unsqueeze(-1).to(device), examples.to(device)]  # (T, N, K+Q, *in)
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
            f"FewShotTasks(classes={self.pool.shape[0]}, per_class={self.pool.shape[1]}, "
            f"n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query})"
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
