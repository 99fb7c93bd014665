"""The one structure shared by datasets, algorithms and the runner: a batch of few-shot tasks."""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return int(self.support_x.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        return TaskBatch(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()))

    def pin_memory(self) -> TaskBatch:
        return TaskBatch(*(t.pin_memory() for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.support_x, self.support_y, self.query_x, self.query_y)

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` as a batch of one (keeps the leading dimension)."""
        return TaskBatch(*(t[i : i + 1] for t in self.tensors()))

    def split(self, chunk: int) -> list[TaskBatch]:
        """Consecutive sub-batches of at most ``chunk`` tasks (for ranks or memory chunks)."""
        return [
            TaskBatch(*(t[i : i + chunk] for t in self.tensors()))
            for i in range(0, len(self), chunk)
        ]
