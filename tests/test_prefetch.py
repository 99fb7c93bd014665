"""The prefetcher yields exactly the synchronous sequence and records exact resume states."""

from __future__ import annotations

import pytest
import torch

from metarun.data import SinusoidTasks
from metarun.data.prefetch import Prefetcher


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_sequence_as_synchronous_and_exact_resume(depth: int) -> None:
    tasks = SinusoidTasks(k_shot=3, k_query=2)
    gen = torch.Generator().manual_seed(0)
    expected = [tasks.sample(4, gen) for _ in range(6)]

    pf = Prefetcher(tasks.sample, 4, torch.Generator().manual_seed(0), depth=depth)
    got = [pf.next() for _ in range(3)]
    state = pf.resume_state
    pf.close()
    # A resumed run restores the recorded state and continues with batch 4, not batch 3+depth.
    pf2 = Prefetcher(tasks.sample, 4, torch.Generator().set_state(state), depth=depth)
    got += [pf2.next() for _ in range(3)]
    pf2.close()
    for a, b in zip(got, expected):
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y)


def test_producer_errors_reach_the_consumer() -> None:
    def broken(n: int, gen: torch.Generator):
        raise ValueError("dataset.n_way must be <= 5")

    pf = Prefetcher(broken, 2, torch.Generator(), depth=2)
    with pytest.raises(ValueError, match="n_way"):
        pf.next()
    pf.close()
