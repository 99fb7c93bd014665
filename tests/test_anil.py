"""ANIL: meta-gradient oracles (a hand-written float64 head-only loop, finite differences), the
body/head split, head selection, the runner and CLI, and a CI-sized Omniglot learning test."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    OMNIGLOT_40_STEPS,
    SMOKE_RUN,
    assert_meta_learned,
    central_difference,
    cli_env,
    grads_and_directions,
    omniglot_random,
    run_metarun,
    scalar_tags,
)
from torch import nn

import metarun
from metarun.algorithms.anil import ANIL, ANILConfig
from metarun.algorithms.maml import MAML
from metarun.config import ConfigError, options
from metarun.data import SinusoidTasks
from metarun.models import MLP, Conv4
from metarun.runner import api
from metarun.runner.build import build_experiment
from metarun.tasks import TaskBatch

DT = torch.float64
LR = 0.3
STEPS = 2
METARUN = str(Path(sys.executable).with_name("metarun"))
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
OMNIGLOT_DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data"))


def _conv4() -> Conv4:
    torch.manual_seed(0)
    return Conv4(num_classes=3, hidden=4, image_size=8).to(DT)


def _anil(model: nn.Module | None = None, **kw) -> ANIL:
    args = dict(task_type="classification", inner_lr=LR, inner_steps=STEPS, eval_inner_steps=3)
    args.update(kw)
    return ANIL(_conv4() if model is None else model, **args).to(DT)


def _images(n_tasks: int = 3, n_way: int = 3, queries: int = 2) -> TaskBatch:
    """3-way 1-shot tasks of 8x8 random images, float64."""
    g = torch.Generator().manual_seed(1)
    return TaskBatch(
        torch.rand(n_tasks, n_way, 1, 8, 8, generator=g, dtype=DT),
        torch.arange(n_way).expand(n_tasks, -1).clone(),
        torch.rand(n_tasks, n_way * queries, 1, 8, 8, generator=g, dtype=DT),
        torch.arange(n_way).repeat(queries).expand(n_tasks, -1).clone(),
    )


def _sinusoid(n_tasks: int = 3) -> TaskBatch:
    b = SinusoidTasks(k_shot=5, k_query=5).sample(n_tasks, torch.Generator().manual_seed(0))
    return TaskBatch(*(t.to(DT) for t in b.tensors()))


def _reference_meta_loss(
    model: Conv4, batch: TaskBatch, lr, steps: int, first_order: bool
) -> torch.Tensor:
    """Hand-written ANIL: features by plain modules (BatchNorm on each batch's statistics), then
    explicit SGD on the classifier's weight and bias, differentiated by torch.autograd. ``lr``:
    a float, a scalar tensor, or ``{"weight": ..., "bias": ...}`` tensors."""
    body = copy.deepcopy(model.features)
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):  # batch statistics, nothing written
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    weights = {n: p for n, p in model.features.named_parameters()}
    rates = lr if isinstance(lr, dict) else {"weight": lr, "bias": lr}
    total = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        support = torch.func.functional_call(body, weights, (sx,)).flatten(1)
        query = torch.func.functional_call(body, weights, (qx,)).flatten(1)
        w, b = model.classifier.weight, model.classifier.bias
        for _ in range(steps):
            loss = F.cross_entropy(support @ w.T + b, sy)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=not first_order)
            w, b = w - rates["weight"] * gw, b - rates["bias"] * gb
        total = total + F.cross_entropy(query @ w.T + b, qy)
    return total / len(batch)


# ----------------------------------------------------------------------- gradient oracles


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_gradient_matches_hand_written_reference(first_order: bool, batching: str) -> None:
    algo = _anil(first_order=first_order, task_batching=batching)
    batch = _images()
    metrics = algo.meta_train_step(batch)
    ref = _reference_meta_loss(algo.model, batch, LR, STEPS, first_order)
    assert metrics["train/meta_loss"] == pytest.approx(ref.item(), rel=1e-12)
    params = list(algo.model.parameters())
    for p, g in zip(params, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["scalar", "per_param"])
def test_learned_inner_lrs_are_the_heads_and_get_their_hypergradients(mode: str) -> None:
    algo = _anil(learn_inner_lr=mode, task_batching="vmap")
    if mode == "per_param":
        assert set(algo.inner_lrs) == {"classifier__weight", "classifier__bias"}
        lrs = {
            "weight": algo.inner_lrs["classifier__weight"],
            "bias": algo.inner_lrs["classifier__bias"],
        }
        learned = list(lrs.values())
    else:
        lrs = algo.inner_lr
        learned = [algo.inner_lr]
    batch = _images()
    algo.meta_train_step(batch)
    ref = _reference_meta_loss(algo.model, batch, lrs, STEPS, first_order=False)
    wrt = [*algo.model.parameters(), *learned]
    for p, g in zip(wrt, torch.autograd.grad(ref, wrt)):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert any(k.startswith("inner_lr/") for k in algo.log_scalars())


def test_meta_gradient_matches_finite_differences() -> None:
    """The meta-loss ANIL reports, differentiated numerically along a random direction (tiny
    MLP, sinusoid regression; the head is the last Linear)."""
    torch.manual_seed(0)
    algo = ANIL(
        MLP(1, (8, 8), 1).to(DT),
        task_type="regression",
        inner_lr=0.05,
        inner_steps=STEPS,
        eval_inner_steps=STEPS,
        task_batching="loop",
    ).to(DT)
    assert algo.head == "layers.4"
    batch = _sinusoid()
    algo.meta_train_step(batch)
    params = list(algo.model.parameters())
    grads, dirs = grads_and_directions(params)
    numeric = central_difference(
        lambda: algo.meta_train_step(batch)["train/meta_loss"], params, dirs
    )
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
    assert analytic == numeric.approx(rel=1e-6)


def test_first_order_drops_only_the_support_path_to_the_body() -> None:
    """First order: the body's meta-gradient comes through the query features alone, so it
    differs from second order, while the head still gets the identity-path gradient."""
    batch = _images()
    second, first = _anil(), _anil(first_order=True)
    second.meta_train_step(batch)
    first.meta_train_step(batch)
    body_second = second.model.features[0][0].weight.grad
    body_first = first.model.features[0][0].weight.grad
    assert body_first.abs().sum() > 0 and not torch.allclose(body_first, body_second)
    assert first.model.classifier.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------ the body/head split


def test_inner_loop_changes_only_the_head_and_the_body_gets_a_meta_gradient() -> None:
    algo = _anil(learn_inner_lr="scalar")
    before = {n: p.detach().clone() for n, p in algo.model.named_parameters()}
    batch = _images()
    sx, sy, qx, _ = (t[0] for t in batch.tensors())
    adapted = algo.adapt(sx, sy, steps=3)
    assert adapted.keys() == before.keys()
    for name, value in adapted.items():
        if name.startswith("classifier."):
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    assert algo.predict(adapted, qx).shape == (6, 3)

    algo.meta_train_step(batch)
    for name, p in algo.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # nothing written in place
    # Every body weight gets a meta-gradient (conv biases before BatchNorm have an exactly zero
    # one, as in MAML, so weights are checked).
    for name, p in algo.model.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert algo.inner_lr.grad is not None and algo.inner_lr.grad != 0


def test_body_features_are_computed_once_per_task_whatever_the_inner_steps() -> None:
    """What makes ANIL fast: two body forwards per task (support and query), not one per inner
    step as in MAML."""
    for steps in (1, 5):
        for cls, expected in ((ANIL, 2), (MAML, steps + 1)):
            algo = cls(
                _conv4(),
                task_type="classification",
                inner_lr=LR,
                inner_steps=steps,
                eval_inner_steps=steps,
                task_batching="loop",
            )
            algo.pre_adaptation_metrics = False
            calls = []
            algo.model.features.register_forward_hook(lambda *_, calls=calls: calls.append(1))
            algo.meta_train_step(_images(n_tasks=2))
            assert len(calls) == 2 * expected, (cls.__name__, steps)


def test_copy_initial_weights_leaves_the_head_init_alone_but_trains_the_body(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        algo = _anil(copy_initial_weights=True)
    assert "head's initial weights (classifier) receive no meta-gradient" in caplog.text
    assert "NO meta-gradient" not in caplog.text  # MAML's warning is about the whole model
    algo.meta_train_step(_images())
    assert algo.model.classifier.weight.grad is None
    assert algo.model.features[0][0].weight.grad.abs().sum() > 0


def test_bn_policies_and_task_batching() -> None:
    batch = _images()
    algo = _anil(bn_policy="running_stats", task_batching="loop")
    running = algo.model.features[0][1].running_mean.clone()
    algo.meta_train_step(batch)
    assert not torch.equal(algo.model.features[0][1].running_mean, running)
    assert algo.evaluate(batch)["post/accuracy"].shape == (3,)
    with pytest.raises(ValueError, match="task_batching=vmap needs algo.bn_policy=batch_stats"):
        _anil(bn_policy="running_stats", task_batching="vmap")
    # The checkpointed inner loop (loop only) gives the same meta-gradient.
    plain, ckpt = _anil(task_batching="loop"), _anil(task_batching="loop", checkpoint_inner=True)
    plain.meta_train_step(batch)
    ckpt.meta_train_step(batch)
    for a, b in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_evaluate_reports_pre_and_post_metrics_per_task() -> None:
    algo = _anil(inner_lr=0.5)
    b = _images(n_tasks=4)
    batch = TaskBatch(b.support_x, b.support_y, b.support_x, b.support_y)  # query = support
    res = algo.evaluate(batch, inner_steps=10)
    assert set(res) == {"pre/loss", "pre/accuracy", "post/loss", "post/accuracy"}
    assert res["post/loss"].shape == (4,)
    assert res["post/loss"].mean() < res["pre/loss"].mean()
    assert all(p.grad is None for p in algo.parameters())


# ------------------------------------------------------------------------------ head selection


def test_head_defaults_to_the_last_linear_and_can_be_named() -> None:
    assert _anil().head == "classifier"
    assert _anil(head="classifier").head == "classifier"
    mlp = ANIL(MLP(1, (8, 8), 1), task_type="regression", inner_lr=0.1, inner_steps=1,
               eval_inner_steps=1)  # fmt: skip
    assert mlp.head == "layers.4"


@pytest.mark.parametrize(
    ("model", "head", "message"),
    [
        (
            Conv4(num_classes=3, hidden=4, image_size=8),
            "clasifier",
            r"algo.head must name a module of Conv4, got 'clasifier' \(set e.g. "
            r"algo.head=classifier; modules: features \(Sequential\), classifier \(Linear\)\)",
        ),
        (
            MLP(1, (8,), 1),
            "layers.1",
            r"algo.head must name a module with trainable parameters, got 'layers.1' \(ReLU",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()),
            None,
            r"algo.head=null adapts the model's last nn.Linear, but Sequential has none",
        ),
    ],
)
def test_a_bad_head_is_refused_naming_algo_head_and_the_modules(model, head, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ANIL(model, task_type="classification", inner_lr=0.1, inner_steps=1, eval_inner_steps=1,
             head=head)  # fmt: skip


def test_a_head_that_does_not_compute_the_output_is_refused_at_the_first_step() -> None:
    algo = _anil(head="features")
    with pytest.raises(ConfigError, match=r"algo.head must name the module that computes"):
        algo.meta_train_step(_images())


# ------------------------------------------------------------------ config, runner, CLI, bench


def test_algo_anil_composes_with_omniglots_inner_loop_defaults(make_config) -> None:
    run = make_config(["algo=anil", "dataset=omniglot"])
    assert type(run.algo) is ANILConfig and run.algo.head is None
    assert (run.algo.inner_lr, run.algo.inner_steps, run.algo.eval_inner_steps) == (0.4, 1, 3)
    assert options(run)["algo"] == "anil" and run.name == "anil_omniglot"
    preset = make_config(["experiment=omniglot_anil_5way_1shot"])
    assert type(preset.algo) is ANILConfig and preset.algo.head == "classifier"
    assert preset.name == "anil_omniglot_5way_1shot" and preset.meta_batch_size == 32
    assert (preset.dataset.n_way, preset.dataset.k_shot, preset.algo.inner_lr) == (5, 1, 0.4)
    with pytest.raises(ConfigError, match=r"algo.head must name a module of Conv4, got 'nope'"):
        build_experiment(make_config(["algo=anil", "dataset=omniglot", "algo.head=nope",
                                      "device=cpu"]), with_data=False)  # fmt: skip


def test_preset_runs_a_couple_of_steps_with_the_tags(make_config, tiny, tmp_path, fake_omniglot):
    args = [
        *tiny,
        "experiment=omniglot_anil_5way_1shot",
        *SMOKE_RUN,
        "dataset.k_query=1",
    ]
    summary = api.run(make_config(args), tmp_path, overrides=args)
    assert summary.step == 2 and summary.results["test"]["inner_steps"] == 3
    assert_meta_learned(tmp_path, {"train/meta_loss", "train/pre_accuracy", "val/accuracy"})


def test_bench_anil_prints_the_ratio() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_anil.py"), "--meta-batch", "2", "--queries", "1",
         "--repeats", "1", "--orders", "second", "--batching", "loop"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = re.search(r"\| 1 \| second \| loop \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", done.stdout)
    assert row is not None, done.stdout
    assert all(float(row.group(i)) > 0 for i in (1, 2, 3))


@pytest.mark.slow
@pytest.mark.skipif(
    not list((OMNIGLOT_DATA / "omniglot").glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_omniglot_short_run_learns(tmp_path):
    """Real data through the CLI: 40 meta-steps of 5-way 1-shot ANIL on the characters present
    (split=random), then the checkpoint adapts and predicts through metarun.load. The body must
    have learned: after one step the same test gives 0.39 (a random body's features with the
    head adapted), after 40 steps 0.62 +- 0.02, after 80 0.69."""
    run_dir = tmp_path / "run"
    args = [
        "algo=anil",
        *omniglot_random(tmp_path),
        *OMNIGLOT_40_STEPS,
        "log.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_metarun(args, tmp_path, env=cli_env(METARUN_DATA=str(OMNIGLOT_DATA)), timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "results.json").read_text())["test"]["metrics"]
    accuracy = metrics["accuracy"]
    assert accuracy["n"] == 100
    assert accuracy["mean"] - accuracy["ci95"] > 0.5  # chance: 0.2
    assert metrics["pre_accuracy"]["mean"] < 0.35  # an unadapted head is at chance
    assert "test accuracy:" in result.stdout

    assert {"train/meta_loss", "hypergrad/norm"} <= scalar_tags(run_dir)

    learner = metarun.load(run_dir / "checkpoints" / "best.pt", device="cpu")
    predict = learner.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
    assert predict(torch.rand(7, 1, 28, 28)).shape == (7, 5)
