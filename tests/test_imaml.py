"""iMAML: the meta-gradient against closed forms on a quadratic inner problem and against finite
differences on a non-linear one (float64), adaptation and evaluation, config and presets, the
memory benchmark, and a CI-sized Omniglot run that learns beyond chance."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SMOKE_RUN, assert_meta_learned
from torch import Tensor, nn

from metarun.algorithms.imaml import IMAML, IMAMLConfig
from metarun.config import ConfigError, options
from metarun.runner import api
from metarun.runner.build import build_experiment
from metarun.runner.evaluate import evaluate_fixed
from metarun.tasks import TaskBatch

DT = torch.float64
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
OMNIGLOT_DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data")) / "omniglot"
PRESETS = ["omniglot_imaml_5way_1shot", "omniglot_imaml_20way_1shot"]


def _regression_batch(n_tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_tasks, 3, 1, generator=g, dtype=DT)
    sx = torch.randn(n_tasks, 8, 3, generator=g, dtype=DT)
    qx = torch.randn(n_tasks, 6, 3, generator=g, dtype=DT)
    return TaskBatch(sx, sx @ w + 0.5, qx, qx @ w + 0.5)


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1).to(DT)


def _quadratic_closed_form(
    theta: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The proximal least-squares problem written out: support MSE (1/n)||Xa phi - y||^2 has
    Hessian H = (2/n) Xa^T Xa, so phi*(theta) = (H + lam I)^-1 ((2/n) Xa^T y + lam theta).
    Returns (phi*, H, g = grad of the query MSE at phi*); theta = [weight, bias] flattened."""
    xa = torch.cat([sx, torch.ones(len(sx), 1, dtype=DT)], 1)
    qa = torch.cat([qx, torch.ones(len(qx), 1, dtype=DT)], 1)
    hess = 2 / len(sx) * xa.T @ xa
    phi = torch.linalg.solve(
        hess + lam * torch.eye(4, dtype=DT), 2 / len(sx) * xa.T @ sy[:, 0] + lam * theta
    )
    g = 2 / len(qx) * qa.T @ (qa @ phi - qy[:, 0])
    return phi, hess, g


def _flat_grad(model: nn.Linear) -> Tensor:
    return torch.cat([model.weight.grad.flatten(), model.bias.grad])


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_meta_gradient_equals_the_closed_form_on_a_quadratic_inner_problem(inner_optimizer):
    """Inner steps to convergence: .grad holds the mean over tasks of d L_query(phi*(theta)) /
    d theta, the derivative of the closed-form solution (autograd through linalg.solve), which
    is also the paper's lam (H + lam I)^-1 g. The inner optimizer only finds phi*."""
    lam = 2.0
    model = _linear()
    algo = IMAML(
        model, task_type="regression", lam=lam, inner_optimizer=inner_optimizer,
        inner_lr=0.1 if inner_optimizer == "sgd" else 0.05, inner_steps=400,
        eval_inner_steps=400, cg_steps=4,
    )  # fmt: skip
    batch = _regression_batch()
    metrics = algo.meta_train_step(batch)
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).requires_grad_()
    total, paper = 0.0, torch.zeros(4, dtype=DT)
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        phi, hess, g = _quadratic_closed_form(theta, sx, sy, qx, qy, lam)
        qa = torch.cat([qx, torch.ones(len(qx), 1, dtype=DT)], 1)
        total = total + F.mse_loss(qa @ phi, qy[:, 0]) / len(batch)
        paper += lam * torch.linalg.solve(hess + lam * torch.eye(4, dtype=DT), g.detach()) / 2
    (exact,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(_flat_grad(model), exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_flat_grad(model), paper, rtol=1e-9, atol=1e-12)
    assert metrics["train/meta_loss"] == pytest.approx(float(total.detach()), rel=1e-9)
    assert metrics["train/cg_residual"] < 1e-8  # CG on 4 unknowns: exact in 4 steps


def test_damped_system_is_the_authors_code_s() -> None:
    """cg_damping and lam_damping: v solves ((1 + c) I + H / (lam + d)) v = g."""
    lam, c, d = 2.0, 1.0, 10.0
    model = _linear()
    algo = IMAML(
        model, task_type="regression", lam=lam, inner_lr=0.1, inner_steps=400,
        eval_inner_steps=0, cg_steps=4, cg_damping=c, lam_damping=d,
    )  # fmt: skip
    batch = _regression_batch(1)
    algo.meta_train_step(batch)
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    _, hess, g = _quadratic_closed_form(theta, *(t[0] for t in batch.tensors()), lam)
    expected = torch.linalg.solve((1 + c) * torch.eye(4, dtype=DT) + hess / (lam + d), g)
    torch.testing.assert_close(_flat_grad(model), expected, rtol=1e-9, atol=1e-12)


def test_meta_gradient_matches_finite_differences_on_a_non_linear_model() -> None:
    """A tanh MLP classifier (51 weights), inner problem solved to convergence, CG to 1e-12:
    the meta-gradient along a random direction equals central differences of the query loss
    at the re-solved inner problem."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    algo = IMAML(
        model, task_type="classification", lam=2.0, inner_lr=0.1, inner_steps=500,
        eval_inner_steps=0, cg_steps=200, cg_tol=1e-12,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(9, 4, generator=g, dtype=DT)
    sy, qy = torch.arange(3).repeat(2), torch.arange(3).repeat(3)
    batch = TaskBatch(sx[None], sy[None], qx[None], qy[None])
    metrics = algo.meta_train_step(batch)
    assert metrics["train/cg_residual"] <= 1e-12
    params = list(model.parameters())
    direction = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction))

    def query_loss_at(shift: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(shift * d)
        try:
            phi = algo._solve_inner(sx, sy, 500, 2.0)
            return float(F.cross_entropy(algo._forward(phi, qx), qy))
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(shift * d)

    h = 1e-5
    numeric = (query_loss_at(h) - query_loss_at(-h)) / (2 * h)
    assert float(analytic) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_vmap_gives_the_loops_meta_gradient_with_batch_norm() -> None:
    """task_batching=vmap (in chunks of 2 of 3 tasks; inner steps, CG and BatchNorm's batch
    statistics under torch.func) against the task loop, float64."""
    from metarun.models import Conv4

    torch.manual_seed(0)
    base = Conv4(num_classes=3, hidden=4, image_size=8).to(DT)
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(
        torch.rand(3, 3, 1, 8, 8, generator=g, dtype=DT), torch.arange(3).expand(3, -1).clone(),
        torch.rand(3, 6, 1, 8, 8, generator=g, dtype=DT),
        torch.arange(3).repeat(2).expand(3, -1).clone(),
    )  # fmt: skip
    grads, metrics = {}, {}
    for mode in ("loop", "vmap"):
        model = copy.deepcopy(base)
        algo = IMAML(
            model, task_type="classification", lam=2.0, inner_lr=0.3, inner_steps=4,
            eval_inner_steps=4, cg_steps=5, task_batching=mode, task_chunk_size=2,
        )  # fmt: skip
        metrics[mode] = {k: float(v) for k, v in algo.meta_train_step(batch).items()}
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["loop"].items():
        torch.testing.assert_close(grads["vmap"][name], grad, rtol=1e-9, atol=1e-12)
    assert metrics["vmap"] == pytest.approx(metrics["loop"], rel=1e-9)
    assert float(grads["loop"]["classifier.weight"].abs().sum()) > 0


def test_inner_problem_is_the_proximal_one_and_nothing_of_it_is_kept() -> None:
    """phi minimises support loss + lam/2 ||phi - theta||^2 (its gradient ~0 after convergence);
    the meta-step leaves no graph: phi is detached and the parameters' .grad have none."""
    model = _linear()
    algo = IMAML(model, task_type="regression", lam=2.0, inner_lr=0.1, inner_steps=300,
                 eval_inner_steps=300)  # fmt: skip
    sx, sy, _, _ = (t[0] for t in _regression_batch(1).tensors())
    phi = algo._solve_inner(sx, sy, 300, 2.0)
    assert all(not t.requires_grad for t in phi.values())
    leaves = {k: t.clone().requires_grad_() for k, t in phi.items()}
    prox = sum(((leaves[k] - p) ** 2).sum() for k, p in model.named_parameters())
    objective = F.mse_loss(algo._forward(leaves, sx), sy) + 1.0 * prox
    grads = torch.autograd.grad(objective, list(leaves.values()))
    assert max(float(g.abs().max()) for g in grads) < 1e-12
    algo.meta_train_step(_regression_batch(1))
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())


def test_frozen_parameters_get_no_gradient_and_adapt_returns_them_unchanged() -> None:
    model = _linear()
    model.bias.requires_grad_(False)
    algo = IMAML(model, task_type="regression", lam=2.0, inner_lr=0.1, inner_steps=3,
                 eval_inner_steps=3)  # fmt: skip
    batch = _regression_batch(1)
    algo.meta_train_step(batch)
    assert model.bias.grad is None and model.weight.grad is not None
    adapted = algo.adapt(batch.support_x[0], batch.support_y[0])
    assert torch.equal(adapted["bias"], model.bias)
    assert not torch.equal(adapted["weight"], model.weight)
    assert algo.predict(adapted, batch.query_x[0]).shape == (6, 1)


def test_evaluate_reports_pre_and_post_metrics_per_task_with_eval_lam() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(2)
    batch = TaskBatch(
        torch.randn(3, 6, 4, generator=g, dtype=DT), torch.arange(3).repeat(2).expand(3, -1),
        torch.randn(3, 9, 4, generator=g, dtype=DT), torch.arange(3).repeat(3).expand(3, -1),
    )  # fmt: skip
    kwargs = dict(task_type="classification", inner_lr=0.5, inner_steps=5, eval_inner_steps=20)
    plain = IMAML(model, lam=2.0, eval_lam=0.0, **kwargs).evaluate(batch)
    held = IMAML(model, lam=2.0, eval_lam=50.0, **kwargs).evaluate(batch)
    assert set(plain) == {"pre/loss", "pre/accuracy", "post/loss", "post/accuracy"}
    assert all(v.shape == (3,) for v in plain.values())
    torch.testing.assert_close(plain["pre/loss"], held["pre/loss"])
    # Plain fine-tuning fits the support set further from theta than a strong proximal term.
    assert bool((plain["post/loss"] != held["post/loss"]).all())
    assert model.training and all(b.abs().sum() == 0 for b in (model[1].running_mean,))


# ------------------------------------------------------------------ config, presets, runner


def test_algo_imaml_composes_and_presets_hold_the_paper_settings(make_config) -> None:
    run = make_config(["algo=imaml", "dataset=omniglot"])
    assert type(run.algo) is IMAMLConfig and options(run)["algo"] == "imaml"
    assert (run.algo.lam, run.algo.inner_lr, run.algo.inner_steps, run.algo.cg_steps) == (
        2.0, 0.1, 16, 5,
    )  # fmt: skip
    assert run.algo.eval_inner_steps == 16 and run.algo.eval_lam == 2.0
    five = make_config(["experiment=omniglot_imaml_5way_1shot"])
    twenty = make_config(["experiment=omniglot_imaml_20way_1shot"])
    for preset, ways, steps in ((five, 5, 16), (twenty, 20, 25)):
        assert type(preset.algo) is IMAMLConfig
        assert (preset.dataset.n_way, preset.dataset.k_shot, preset.dataset.k_query) == (ways, 1, 1)
        assert (preset.algo.inner_steps, preset.algo.eval_inner_steps) == (steps, steps)
        assert (preset.algo.lam, preset.algo.eval_lam, preset.algo.cg_steps) == (2.0, 0.0, 5)
        assert (preset.algo.cg_damping, preset.algo.lam_damping) == (1.0, 10.0)
        assert preset.meta_batch_size == 32 and preset.meta_optimizer.lr == 0.001
    assert five.name == "imaml_omniglot_5way_1shot" and twenty.name == "imaml_omniglot_20way_1shot"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.lam=0", "algo.lam must be > 0, got 0.0 (set e.g. algo.lam=2.0)"),
        ("algo.inner_steps=0", "algo.inner_steps must be >= 1, got 0"),
        ("algo.eval_lam=-1", "algo.eval_lam must be >= 0, got -1.0"),
        ("algo.cg_steps=0", "algo.cg_steps must be >= 1, got 0 (set e.g. algo.cg_steps=5)"),
        ("algo.cg_damping=-0.5", "algo.cg_damping must be >= 0, got -0.5"),
        ("algo.cg_tol=nan", "algo.cg_tol must be >= 0, got nan"),
        ("algo.task_batching=auto", "algo.task_batching must be loop or vmap for algo=imaml"),
        ("dataset.eval_n_way=3", "dataset.eval_n_way must equal dataset.n_way (5) for algo=imaml"),
    ],
)
def test_bad_values_are_refused_naming_the_key(make_config, override, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(["algo=imaml", "dataset=omniglot", override])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_a_couple_of_steps(make_config, tiny, tmp_path, fake_omniglot, preset):
    args = [
        *tiny, f"experiment={preset}", *SMOKE_RUN, "meta_batch_size=2", "model.hidden=4",
        "algo.inner_steps=2", "algo.eval_inner_steps=2",
    ]  # fmt: skip
    summary = api.run(make_config(args), tmp_path, overrides=args)
    assert summary.step == 2 and summary.results["test"]["inner_steps"] == 2
    assert_meta_learned(tmp_path, {"train/meta_loss", "train/cg_residual", "val/accuracy"})


# -------------------------------------------------------------------------------- benchmark


def test_bench_implicit_prints_memory_flat_in_the_inner_steps() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_implicit.py"), "--model", "mlp",
         "--steps", "1", "6", "--queries", "2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", done.stdout)
    assert [int(r[0]) for r in rows] == [1, 6], done.stdout
    (_, unrolled1, implicit1, _), (_, unrolled6, implicit6, _) = rows
    assert float(implicit6) == float(implicit1) > 0  # independent of the inner steps
    assert float(unrolled6) > float(unrolled1) > 0  # the unrolled graph grows with them


@pytest.mark.slow
@pytest.mark.skipif(
    not list(OMNIGLOT_DATA.glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_omniglot_minimal_splits_learn_beyond_chance(make_config, tmp_path, monkeypatch):
    """40 iMAML steps (5-way 1-shot, meta-batch 4, 5 inner steps, Conv4 with 32 filters) through
    the runner on the characters of the two minimal splits (split=random): test accuracy beyond
    chance (0.2) and beyond what the same adaptation reaches from the initial weights (0.38 +-
    0.02 after one step; 0.54 +- 0.02 after the 40)."""
    monkeypatch.setenv("METARUN_DATA", str(OMNIGLOT_DATA.parent))
    args = [
        "algo=imaml", "dataset=omniglot", "dataset.split=random",
        f"dataset.cache_dir={tmp_path / 'cache'}",  # not next to the shared archives
        "model.hidden=32", "algo.inner_steps=5", "outer_steps=40", "meta_batch_size=4",
        "eval.every=0", "eval.num_tasks=100", "eval.batch_size=25", "log.every=10",
        "log.progress=false", "save.every=0", "device=cpu",
    ]  # fmt: skip
    config = make_config(args)
    initial = build_experiment(config)
    baseline = evaluate_fixed(
        initial.algorithm, initial.tasks.test, num_tasks=100, batch_size=25,
        seed=config.eval.test_seed, device=initial.device,
    )["post/accuracy"]  # fmt: skip
    summary = api.run(config, tmp_path / "run", overrides=args)
    accuracy = summary.results["test"]["metrics"]["accuracy"]
    assert accuracy["mean"] - accuracy["ci95"] > 0.2 + 0.25
    assert accuracy["mean"] - accuracy["ci95"] > baseline.mean + baseline.ci95
