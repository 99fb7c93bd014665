"""CUDA checks (run only where a GPU is present; the CUDA smoke run of the CLI is in
scripts/, not CI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metarun.unroll as mu
from metarun.algorithms.maml import MAML
from metarun.models import Conv4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_innerloop_on_cuda_matches_cpu() -> None:
    def run(device: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(10, 4, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (10,), generator=g)
        model.to(device)
        x, y = x.to(device), y.to(device)
        with mu.innerloop_ctx(model, opt, device=device, copy_initial_weights=False) as (fm, do):
            for _ in range(3):
                do.step(F.cross_entropy(fm(x), y))
            F.cross_entropy(fm(x), y).backward()
        return [p.grad.cpu() for p in model.parameters()]

    for a, b in zip(run("cuda"), run("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_vmap_equals_loop_on_cuda() -> None:
    batch_x = torch.rand(4, 6, 1, 28, 28, device="cuda", dtype=torch.float64)
    y = torch.arange(3, device="cuda").repeat(2).expand(4, -1).contiguous()
    from metarun.tasks import TaskBatch

    batch = TaskBatch(batch_x, y, batch_x, y)
    grads = []
    for mode in ("loop", "vmap"):
        torch.manual_seed(0)
        algo = MAML(
            Conv4(num_classes=3, hidden=8).double().cuda(),
            task_type="classification",
            inner_lr=0.1,
            inner_steps=2,
            eval_inner_steps=2,
            task_batching=mode,
        )
        algo.meta_train_step(batch)
        grads.append(torch.cat([p.grad.flatten() for p in algo.model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-10


def test_auto_measures_cuda_peaks_and_respects_the_budget() -> None:
    from metarun.algorithms.autotune import choose_task_batching
    from metarun.tasks import TaskBatch

    x = torch.rand(8, 5, 1, 28, 28, device="cuda")
    y = torch.arange(5, device="cuda").expand(8, -1).contiguous()
    batch = TaskBatch(x, y, x, y)
    torch.manual_seed(0)
    algo = MAML(
        Conv4(num_classes=5).cuda(),
        task_type="classification",
        inner_lr=0.1,
        inner_steps=1,
        eval_inner_steps=1,
    )
    free = choose_task_batching(algo, batch, torch.device("cuda"), repeats=1)
    assert free.bytes > 0  # the real peak allocated bytes of the chosen candidate
    # A budget below any vmap candidate's peak leaves the loop.
    tight = choose_task_batching(
        algo, batch, torch.device("cuda"), repeats=1, memory_budget_mb=1e-3
    )
    assert tight.mode == "loop" and algo.task_batching.value == "loop"
    assert all(p.grad is None for p in algo.parameters())
