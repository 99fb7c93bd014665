"""MAML / FOMAML on the functional core: gradient oracles and behaviour."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import central_difference, grads_and_directions
from torch import nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.maml import MAML
from metarun.data import FewShotTasks, SinusoidTasks
from metarun.models import MLP, Conv4
from metarun.tasks import TaskBatch

DT = torch.float64


def _batch(n_tasks: int = 3) -> TaskBatch:
    b = SinusoidTasks(k_shot=5, k_query=5).sample(n_tasks, torch.Generator().manual_seed(0))
    return TaskBatch(*(t.to(DT) for t in b.tensors()))


def _maml(**kw) -> MAML:
    torch.manual_seed(0)
    args = dict(task_type="regression", inner_lr=0.05, inner_steps=2, eval_inner_steps=3)
    args.update(kw)
    return MAML(MLP(1, (8, 8), 1).to(DT), **args).to(DT)


def _reference_meta_loss(
    model: nn.Module, batch: TaskBatch, lr: float, steps: int, first_order: bool = False
) -> torch.Tensor:
    """Hand-written MAML with torch.func.functional_call and autograd.grad."""
    total = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = F.mse_loss(torch.func.functional_call(model, params, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        total = total + F.mse_loss(torch.func.functional_call(model, params, (qx,)), qy)
    return total / len(batch)


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_meta_gradient_matches_reference(first_order: bool) -> None:
    algo = _maml(first_order=first_order)
    assert isinstance(algo, MetaAlgorithm)
    batch = _batch()
    algo.meta_train_step(batch)
    ref = _reference_meta_loss(algo.model, batch, 0.05, 2, first_order)
    ref_grads = torch.autograd.grad(ref, list(algo.model.parameters()))
    for p, g in zip(algo.model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_meta_gradient_matches_finite_differences() -> None:
    algo = _maml()
    batch = _batch()
    algo.meta_train_step(batch)
    params = list(algo.model.parameters())
    grads, dirs = grads_and_directions(params)
    numeric = central_difference(
        lambda: _reference_meta_loss(algo.model, batch, 0.05, 2).detach(), params, dirs
    )
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
    assert analytic == numeric.approx(rel=1e-6)


def test_learned_inner_lrs_get_hypergradients() -> None:
    for mode in ("scalar", "per_param"):
        algo = _maml(learn_inner_lr=mode)
        algo.meta_train_step(_batch())
        lrs = [p for n, p in algo.named_parameters() if n.startswith("inner_lr")]
        assert lrs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lrs)
        scalars = algo.log_scalars()
        assert any(k.startswith("inner_lr/") for k in scalars)
    # The scalar hypergradient equals a finite difference of the meta-loss in the lr.
    algo = _maml(learn_inner_lr="scalar")
    batch = _batch()
    algo.meta_train_step(batch)
    eps = 1e-6
    fd = (
        _reference_meta_loss(algo.model, batch, 0.05 + eps, 2).item()
        - _reference_meta_loss(algo.model, batch, 0.05 - eps, 2).item()
    ) / (2 * eps)
    assert algo.inner_lr.grad.item() == pytest.approx(fd, rel=1e-6)


def test_copy_initial_weights_warns_and_gives_no_meta_gradient(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        algo = _maml(copy_initial_weights=True, learn_inner_lr="scalar")
    assert "NO meta-gradient" in caplog.text
    algo.meta_train_step(_batch())
    assert all(p.grad is None for p in algo.model.parameters())
    assert algo.inner_lr.grad is not None


def test_evaluate_and_adapt() -> None:
    algo = _maml(inner_lr=0.01)
    b = _batch(4)
    # Query = support: small-step gradient descent must lower the loss it descends.
    batch = TaskBatch(b.support_x, b.support_y, b.support_x, b.support_y)
    res = algo.evaluate(batch, inner_steps=5)
    assert set(res) == {"pre/loss", "post/loss"}
    assert res["post/loss"].shape == (4,)
    assert res["post/loss"].mean() < res["pre/loss"].mean()
    assert not torch.equal(res["post/loss"], algo.evaluate(batch, inner_steps=1)["post/loss"])
    sx, sy, qx, _ = (t[0] for t in batch.tensors())
    params = algo.adapt(sx, sy, steps=2)
    assert all(not p.requires_grad or p.grad_fn is None for p in params.values())
    assert algo.predict(params, qx).shape == (5, 1)
    assert all(p.grad is None for p in algo.model.parameters())


def _conv4_tasks() -> TaskBatch:
    torch.manual_seed(0)
    pool = torch.rand(10, 6, 1, 28, 28)
    return FewShotTasks(pool, n_way=3, k_shot=1, k_query=2).sample(
        2, torch.Generator().manual_seed(0)
    )


def _conv4_maml(bn_policy: str) -> MAML:
    torch.manual_seed(0)
    return MAML(
        Conv4(num_classes=3, hidden=8),
        task_type="classification",
        inner_lr=0.4,
        inner_steps=1,
        eval_inner_steps=2,
        bn_policy=bn_policy,
        task_batching="loop",
    )


def test_conv4_batchnorm_policies_keep_running_stats_as_documented() -> None:
    batch = _conv4_tasks()
    for policy, changes in (("batch_stats", False), ("running_stats", True)):
        algo = _conv4_maml(policy)
        bufs = {n: b.clone() for n, b in algo.model.named_buffers()}
        metrics = algo.meta_train_step(batch)
        assert 0.0 <= metrics["train/accuracy"] <= 1.0
        moved = any(not torch.equal(b, bufs[n]) for n, b in algo.model.named_buffers())
        assert moved == changes, policy
        res = algo.evaluate(batch)
        assert res["post/accuracy"].shape == (2,)


def test_running_statistics_do_not_depend_on_which_steps_are_logged() -> None:
    """The pre-adaptation metric is a measurement: under bn_policy=running_stats its query
    forward must not write the running statistics, or a run's weights would depend on
    log.every (the runner asks for it on logged steps only)."""
    batch = _conv4_tasks()
    buffers = []
    for logged in (False, True):
        algo = _conv4_maml("running_stats")
        algo.pre_adaptation_metrics = logged
        algo.meta_train_step(batch)
        buffers.append({n: b.clone() for n, b in algo.model.named_buffers()})
    for name, value in buffers[0].items():
        assert torch.equal(value, buffers[1][name]), name


def test_sinusoid_meta_training_reduces_post_adaptation_loss() -> None:
    torch.manual_seed(0)
    algo = MAML(
        MLP(1, (40, 40), 1),
        task_type="regression",
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=5,
    )
    tasks = SinusoidTasks(k_shot=10, k_query=10)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(algo.meta_parameters(), lr=3e-3)
    eval_batch = tasks.sample(50, torch.Generator().manual_seed(99))
    before = algo.evaluate(eval_batch)["post/loss"].mean().item()
    for _ in range(300):
        opt.zero_grad()
        algo.meta_train_step(tasks.sample(10, gen))
        opt.step()
    after = algo.evaluate(eval_batch)["post/loss"].mean().item()
    assert after < 0.6 * before


def test_checkpointed_inner_loop_gives_the_same_meta_gradient() -> None:
    batch = _batch()
    plain = _maml(inner_steps=3)
    plain.meta_train_step(batch)
    ckpt = _maml(inner_steps=3, checkpoint_inner=True)
    ckpt.meta_train_step(batch)
    for a, b in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="checkpoint_inner=true needs algo.task_batching=loop"):
        _maml(checkpoint_inner=True, task_batching="vmap")
