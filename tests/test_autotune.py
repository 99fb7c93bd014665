"""task_batching=auto picks a measured candidate, respects the memory budget, keeps numerics."""

from __future__ import annotations

import torch

from metarun.algorithms.maml import MAML
from metarun.data import FewShotTasks
from metarun.models import Conv4
from metarun.runner.autotune import candidates, choose_task_batching, task_graph_bytes


def _setup():
    torch.manual_seed(0)
    algo = MAML(
        Conv4(num_classes=3, hidden=4),
        task_type="classification",
        inner_lr=0.1,
        inner_steps=1,
        eval_inner_steps=1,
    )
    pool = torch.rand(8, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    batch = FewShotTasks(pool, 3, 1, 1).sample(4, torch.Generator().manual_seed(0))
    return algo, batch


def test_candidates() -> None:
    assert candidates(32) == [
        ("loop", None),
        ("vmap", None),
        ("vmap", 16),
        ("vmap", 8),
        ("vmap", 4),
        ("vmap", 2),
    ]


def test_choice_is_applied_and_gradients_discarded() -> None:
    algo, batch = _setup()
    choice = choose_task_batching(algo, batch, torch.device("cpu"), repeats=1)
    assert algo.task_batching.value == choice.mode
    assert algo.task_chunk_size == choice.chunk
    assert all(p.grad is None for p in algo.parameters())
    assert algo.pre_adaptation_metrics


def test_memory_budget_excludes_full_vmap() -> None:
    algo, batch = _setup()
    per_task = task_graph_bytes(algo, batch)
    assert per_task > 0
    # Room for 2.5 tasks' graphs: full vmap (4 tasks) is out, chunks of 2 or the loop are in.
    choice = choose_task_batching(
        algo, batch, torch.device("cpu"), memory_budget_mb=2.5 * per_task / 2**20, repeats=1
    )
    assert choice.mode == "loop" or choice.chunk == 2
    assert choice.bytes <= 2.5 * per_task
    # A budget below any candidate's graph: falls back to the loop.
    choice = choose_task_batching(
        algo, batch, torch.device("cpu"), memory_budget_mb=1e-6, repeats=1
    )
    assert choice.mode == "loop"
