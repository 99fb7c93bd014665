"""Vectorised task batches: vmap meta-gradients equal the task loop's (float64, rel <= 1e-10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.maml import MAML
from metarun.data import FewShotTasks, SinusoidTasks
from metarun.models import MLP, Conv4
from metarun.tasks import TaskBatch

DT = torch.float64


def _conv(bn: bool) -> nn.Module:
    return Conv4(num_classes=3, hidden=6, image_size=28, batch_norm=bn)


def _classification_batch() -> TaskBatch:
    pool = torch.rand(12, 6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    b = FewShotTasks(pool, n_way=3, k_shot=2, k_query=2).sample(4, torch.Generator().manual_seed(1))
    return TaskBatch(b.support_x.to(DT), b.support_y, b.query_x.to(DT), b.query_y)


def _regression_batch() -> TaskBatch:
    b = SinusoidTasks(k_shot=5, k_query=5).sample(4, torch.Generator().manual_seed(0))
    return TaskBatch(*(t.to(DT) for t in b.tensors()))


def _grads(model_fn, batch, *, mode: str, chunk=None, **kw) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = model_fn().to(DT)
    algo = MAML(model, task_batching=mode, task_chunk_size=chunk, **kw).to(DT)
    metrics = algo.meta_train_step(batch)
    return [p.grad.clone() for p in algo.meta_parameters()], metrics


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative error over all parameters at once. Per tensor it would be meaningless for conv
    biases before BatchNorm: their true gradient is exactly zero (BN removes the mean), so both
    sides hold only rounding noise there."""
    fa = torch.cat([t.flatten() for t in a])
    fb = torch.cat([t.flatten() for t in b])
    return ((fa - fb).norm() / fb.norm()).item()


CASES = {
    "conv_bn": (lambda: _conv(True), _classification_batch, "classification"),
    "conv_nobn": (lambda: _conv(False), _classification_batch, "classification"),
    "mlp": (lambda: MLP(1, (16, 16), 1), _regression_batch, "regression"),
}


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_vmap_matches_loop(case: str, steps: int, first_order: bool) -> None:
    model_fn, batch_fn, task_type = CASES[case]
    batch = batch_fn()
    kw = dict(
        task_type=task_type,
        inner_lr=0.1,
        inner_steps=steps,
        eval_inner_steps=steps,
        first_order=first_order,
    )
    loop, m_loop = _grads(model_fn, batch, mode="loop", **kw)
    vmap, m_vmap = _grads(model_fn, batch, mode="vmap", **kw)
    chunked, _ = _grads(model_fn, batch, mode="vmap", chunk=3, **kw)
    assert _rel(vmap, loop) <= 1e-10
    assert _rel(chunked, loop) <= 1e-10
    for key in m_loop:
        assert float(m_vmap[key]) == pytest.approx(float(m_loop[key]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("learn", ["scalar", "per_param"])
def test_vmap_with_learned_learning_rates(learn: str) -> None:
    batch = _classification_batch()
    kw = dict(
        task_type="classification",
        inner_lr=0.1,
        inner_steps=2,
        eval_inner_steps=2,
        learn_inner_lr=learn,
    )
    loop, _ = _grads(lambda: _conv(True), batch, mode="loop", **kw)
    vmap, _ = _grads(lambda: _conv(True), batch, mode="vmap", **kw)
    assert len(loop) == len(vmap)
    assert _rel(vmap, loop) <= 1e-10


def test_flattening_tasks_into_one_batch_would_be_wrong() -> None:
    """The trap this guards against: BN statistics over all tasks at once differ from per-task
    statistics, so a meta-batch folded into one big batch gives different meta-gradients."""
    batch = _classification_batch()
    torch.manual_seed(0)
    model = _conv(True).to(DT)
    x = batch.query_x.flatten(0, 1)
    per_task = torch.cat([model(batch.query_x[i]) for i in range(len(batch))])
    folded = model(x)
    assert (per_task - folded).abs().max() > 1e-3


def test_vmap_refuses_running_statistics() -> None:
    with pytest.raises(ValueError, match="task_batching=vmap needs algo.bn_policy=batch_stats"):
        MAML(
            _conv(True),
            task_type="classification",
            inner_lr=0.1,
            inner_steps=1,
            eval_inner_steps=1,
            task_batching="vmap",
            bn_policy="running_stats",
        )
