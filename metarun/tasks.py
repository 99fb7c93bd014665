"""The one structure shared by datasets, algorithms and the runner: a batch of few-shot tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """``T`` tasks of identical shapes, stacked on a leading task dimension.

    Attributes:
        support_x: ``(T, S, *input_shape)`` support inputs.
        support_y: ``(T, S)`` int64 class labels in ``[0, n_way)``, or ``(T, S, 1)`` float targets.
        query_x: ``(T, Q, *input_shape)`` query inputs.
        query_y: ``(T, Q)`` or ``(T, Q, 1)``, like ``support_y``.
        support_info: optional ``(T, S)`` side information about the support examples that
            algorithms may log but never train on (e.g. the true labels behind noisy ones).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    support_info: Tensor | None = None

    def __len__(self) -> int:
        return int(self.support_x.shape[0])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TaskBatch:
        info = None if self.support_info is None else fn(self.support_info)
        support_x, support_y, query_x, query_y = (fn(t) for t in self.tensors())
        return TaskBatch(support_x, support_y, query_x, query_y, support_info=info)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        target = torch.device(device)
        if all(t.device == target for t in self.tensors()) and (
            self.support_info is None or self.support_info.device == target
        ):
            # Already there: every step would otherwise pay five no-op copies' dispatch.
            return self
        return self._map(lambda t: t.to(target, non_blocking=non_blocking))

    def pin_memory(self) -> TaskBatch:
        return self._map(lambda t: t.pin_memory())

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.support_x, self.support_y, self.query_x, self.query_y)

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` as a batch of one (keeps the leading dimension)."""
        return self._map(lambda t: t[i : i + 1])

    def split(self, chunk: int) -> list[TaskBatch]:
        """Consecutive sub-batches of at most ``chunk`` tasks (for ranks or memory chunks)."""
        if chunk >= len(self):
            return [self]

        def rows(start: int) -> Callable[[Tensor], Tensor]:
            return lambda t: t[start : start + chunk]

        return [self._map(rows(i)) for i in range(0, len(self), chunk)]


class TaskSource(Protocol):
    """Anything that draws a batch of tasks from a generator."""

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch: ...


@runtime_checkable
class FixedExamples(Protocol):
    """A validation or test source that is a fixed labelled set evaluated whole, example by
    example (one-task batches with an empty support set: nothing adapts), instead of tasks
    sampled with the evaluation seed. Reports count examples, not tasks."""

    def batches(self) -> Iterable[TaskBatch]: ...

    def __len__(self) -> int: ...


@dataclass
class TaskSources:
    """Where a dataset's tasks come from: training tasks are sampled afresh, val/test tasks are
    fixed by the evaluation seeds."""

    train: TaskSource
    val: Any
    test: Any
