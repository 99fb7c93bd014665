"""Data parallelism as algorithms see it: this process's share of each step's examples, and a
sum over processes. Torch only: the runner supplies the all-reduce (torch.distributed), so an
algorithm never depends on how processes talk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Shards:
    """This process's place among ``world_size`` data-parallel processes.

    Attributes:
        rank: this process, ``0 <= rank < world_size``.
        world_size: the processes sharing each step's examples.
        all_reduce: sums a tensor over the processes, in place (``torch.distributed.all_reduce``
            in the runner; the algorithm itself does not depend on torch.distributed).
    """

    rank: int
    world_size: int
    all_reduce: Callable[[Tensor], None]

    def take(self, t: Tensor, key: str) -> Tensor:
        """This process's equal share of the examples of ``t`` (dimension 0)."""
        n = t.shape[0]
        if n % self.world_size:
            raise ValueError(
                f"{key} must be divisible by the number of processes ({self.world_size}), got {n}"
            )
        share = n // self.world_size
        return t[self.rank * share : (self.rank + 1) * share]

    def total(self, t: Tensor) -> Tensor:
        out = t.clone()
        self.all_reduce(out)
        return out

    def mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean over processes of each of ``tensors`` (one all-reduce of them all)."""
        flat = self.total(torch.cat([t.reshape(-1) for t in tensors])) / self.world_size
        return [
            part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)
        ]


SINGLE = Shards(0, 1, lambda t: None)
