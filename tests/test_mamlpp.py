"""MAML++ (Antoniou et al. 2019) as options of MAML: multi-step loss, per-layer per-step inner
learning rates, per-step BatchNorm weights and statistics, derivative-order annealing, and the
presets that turn them all on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import sigterm_after
from torch import nn

from metarun.algorithms.maml import MAML
from metarun.algorithms.stepwise import MSL_FLOOR, msl_weights
from metarun.config import ConfigError, options
from metarun.runner import api
from metarun.runner.checkpoint import load_checkpoint
from metarun.tasks import TaskBatch

DT = torch.float64
LR = 0.05


def _bn_model() -> nn.Module:
    """A tiny regressor whose batch norm makes each output depend on the rest of its batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).to(DT)


def _batch(tasks: int = 3, support: int = 6, query: int = 5, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        support_x=torch.randn(tasks, support, 3, generator=g, dtype=DT),
        support_y=torch.randn(tasks, support, 2, generator=g, dtype=DT),
        query_x=torch.randn(tasks, query, 3, generator=g, dtype=DT) + 0.5,
        query_y=torch.randn(tasks, query, 2, generator=g, dtype=DT),
    )


def _maml(**kw) -> MAML:
    args = dict(
        task_type="regression",
        inner_lr=LR,
        inner_steps=3,
        eval_inner_steps=3,
        task_batching="loop",
    )
    args.update(kw)
    return MAML(_bn_model(), **args).to(DT)


def _grads(algo: MAML) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None}


def _meta_step(algo: MAML, batch: TaskBatch, step: int = 0) -> dict[str, float]:
    algo.zero_grad(set_to_none=True)
    algo.set_step(step)
    return {k: float(v) for k, v in algo.meta_train_step(batch).items()}


ALL_ON = dict(
    multi_step_loss=True,
    msl_anneal_steps=10,
    learn_inner_lr="per_layer_per_step",
    per_step_bn=True,
)


# ------------------------------------------------------------------------- all flags off


def test_options_off_compute_what_plain_maml_computes() -> None:
    """Default MAML and MAML with every MAML++ option given explicitly off: identical metrics
    and gradients, bit for bit, on both task batchings; no extra parameters or buffers."""
    batch = _batch()
    for batching in ("loop", "vmap"):
        default, off = (
            _maml(task_batching=batching),
            _maml(
                task_batching=batching,
                multi_step_loss=False,
                learn_inner_lr="off",
                per_step_bn=False,
                first_order_until=None,
            ),
        )
        assert default.state_dict().keys() == off.state_dict().keys()
        assert _meta_step(default, batch, step=7) == _meta_step(off, batch, step=7)
        for (n, a), b in zip(_grads(default).items(), _grads(off).values()):
            assert torch.equal(a, b), (batching, n)


def test_neutral_options_give_plain_mamls_meta_gradient() -> None:
    """The step-by-step unroll itself is MAML: per-step rates all at the initial rate and the
    multi-step loss after its annealing (final step only) give plain MAML's meta-loss and
    meta-gradient on the model's weights."""
    batch = _batch()
    plain = _maml()
    stepwise = _maml(learn_inner_lr="per_layer_per_step", multi_step_loss=True, msl_anneal_steps=5)
    a, b = _meta_step(plain, batch), _meta_step(stepwise, batch, step=5)
    assert a["train/meta_loss"] == pytest.approx(b["train/meta_loss"], rel=1e-12)
    ga, gb = _grads(plain), _grads(stepwise)
    for n, g in ga.items():
        torch.testing.assert_close(gb[n], g, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- multi-step loss


def _paper_weights(steps: int, epoch: float, epochs: float) -> list[float]:
    """The schedule as the paper's Sec. 4 and its code describe it, written out step by step:
    every weight starts at 1/steps, the non-final ones decay by 1/(steps*epochs) per epoch to a
    floor of 0.03/steps, the final one grows by (steps-1)/(steps*epochs) per epoch up to
    1 - (steps-1)*0.03/steps."""
    decay = 1.0 / steps / epochs
    out = []
    for _ in range(steps - 1):
        out.append(max(1.0 / steps - epoch * decay, 0.03 / steps))
    out.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * 0.03 / steps))
    return out


def test_msl_weights_follow_the_papers_schedule_then_the_final_step_alone() -> None:
    assert MSL_FLOOR == 0.03
    for steps in (1, 2, 5):
        for outer in (0, 1, 37, 60, 97, 99):
            got = msl_weights(steps, outer, 100)
            assert got == pytest.approx(_paper_weights(steps, outer, 100), abs=1e-15)
            assert sum(got) == pytest.approx(1.0)
        assert msl_weights(steps, 100, 100) is None and msl_weights(steps, 10**6, 100) is None
    assert msl_weights(5, 0, 100) == pytest.approx([0.2] * 5)


def _reference_msl_loss(
    algo: MAML, batch: TaskBatch, weights: list[float], lrs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Hand-written MAML++ meta-loss with per-step BatchNorm weights (batch statistics): at
    inner step t the support loss uses step t's BN weights and per-layer rates lrs[name][t];
    the query loss after step t, with step t's BN weights, weighs weights[t]."""
    model = algo.model
    bn = algo.per_step_bn
    assert bn is not None
    own = dict(model.named_parameters())
    stats_off = {f"1.{k}": None for k in ("running_mean", "running_var", "num_batches_tracked")}

    def bn_at(t: int) -> dict[str, torch.Tensor]:
        if t == 0:
            return {n: own[n] for n in ("1.weight", "1.bias")}
        return {n: bn.affine[f"step{t}__" + n.replace(".", "__")] for n in ("1.weight", "1.bias")}

    def forward(p, x):
        return torch.func.functional_call(model, {**p, **stats_off}, (x,))

    total = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        fast = {n: p for n, p in own.items() if n not in ("1.weight", "1.bias")}
        for t in range(len(weights)):
            loss = F.mse_loss(forward({**fast, **bn_at(t)}, sx), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lrs[n][t] * g for (n, p), g in zip(fast.items(), grads)}
            total = total + weights[t] * F.mse_loss(forward({**fast, **bn_at(t)}, qx), qy)
    return total / len(batch)


def test_all_options_meta_gradient_matches_a_hand_written_reference() -> None:
    """Multi-step loss (mid-annealing), per-step BN weights and per-step rates together: the
    meta-loss and the meta-gradient of every meta-parameter (initial weights, per-step BN
    copies, per-step rates) equal the hand-written reference's."""
    algo = _maml(**ALL_ON)
    assert algo.step_lrs is not None and algo.per_step_bn is not None
    with torch.no_grad():  # distinct rates per layer and step, distinct BN copies per step
        for j, p in enumerate(algo.step_lrs.values()):
            p.copy_(torch.tensor([0.03, 0.05, 0.08], dtype=DT) * (1 + 0.1 * j))
        for p in algo.per_step_bn.affine.values():
            p.add_(torch.randn_like(p) * 0.1)
    batch = _batch()
    metrics = _meta_step(algo, batch, step=4)
    weights = msl_weights(3, 4, 10)
    assert weights is not None and weights[0] < 1 / 3 < weights[-1]
    lrs = {k.replace("__", "."): v for k, v in algo.step_lrs.items()}
    ref = _reference_msl_loss(algo, batch, weights, lrs)
    assert metrics["train/meta_loss"] == pytest.approx(float(ref.detach()), rel=1e-12)
    assert metrics["train/meta_loss"] != pytest.approx(metrics["train/post_loss"])
    names = [n for n, p in algo.named_parameters() if p.grad is not None]
    params = [p for n, p in algo.named_parameters() if p.grad is not None]
    assert any(n.startswith("step_lrs.") for n in names)
    assert any(n.startswith("per_step_bn.affine.") for n in names)
    ref_grads = torch.autograd.grad(ref, params)
    for n, p, g in zip(names, params, ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=n)
    # BN weights are meta-learned per step, never adapted: the model's own get a gradient
    # only through step 0.
    assert algo.model[1].weight.grad is not None


def test_per_layer_per_step_rates_meta_gradient_matches_finite_differences() -> None:
    """float64 central differences of the meta-loss w.r.t. every per-step rate (second order,
    multi-step loss and per-step BN on)."""
    algo = _maml(**ALL_ON)
    batch = _batch(tasks=2)
    _meta_step(algo, batch, step=3)
    assert algo.step_lrs is not None
    analytic = {k: p.grad.clone() for k, p in algo.step_lrs.items() if p.grad is not None}
    eps = 1e-6
    for key, rates in algo.step_lrs.items():
        assert rates.shape == (3,) and key in analytic
        for t in range(3):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    rates[t] += sign * eps
                values.append(_meta_step(algo, batch, step=3)["train/meta_loss"])
                with torch.no_grad():
                    rates[t] -= sign * eps
            fd = (values[0] - values[1]) / (2 * eps)
            assert float(analytic[key][t]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (key, t)


def test_vmap_computes_what_the_loop_computes_with_every_option_on() -> None:
    batch = _batch()
    loop, vmap = _maml(**ALL_ON), _maml(**ALL_ON, task_batching="vmap")
    a, b = _meta_step(loop, batch, step=2), _meta_step(vmap, batch, step=2)
    for key in ("train/meta_loss", "train/post_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    gb = _grads(vmap)
    for n, g in _grads(loop).items():
        torch.testing.assert_close(gb[n], g, rtol=1e-9, atol=1e-12, msg=n)


# -------------------------------------------------------------------- per-step batch norm


def _stats(algo: MAML) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in algo.named_buffers()}


def test_per_step_running_statistics_come_from_support_batches_only() -> None:
    """bn_policy=running_stats: every step's copy of the statistics moves (each from its own
    support forward), and a different query batch changes no statistic at all."""
    batch = _batch()
    other_query = TaskBatch(batch.support_x, batch.support_y, batch.query_x * 3 + 1, batch.query_y)
    runs = []
    for b in (batch, other_query):
        algo = _maml(per_step_bn=True, bn_policy="running_stats", multi_step_loss=True)
        before = _stats(algo)
        _meta_step(algo, b)
        runs.append(_stats(algo))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name  # the query reached no statistic
    means = [n for n in before if n.endswith("running_mean")]
    assert len(means) == 3  # step 0: the model's own; steps 1, 2: copies
    for n in means:
        assert not torch.equal(runs[0][n], before[n]), n
    assert not torch.equal(
        runs[0]["model.1.running_mean"], runs[0]["per_step_bn.step1__1__running_mean"]
    )


def test_per_step_statistics_normalise_evaluation_and_are_checkpointed() -> None:
    """In evaluation (running_stats) inner step t normalises with copy t: changing copy 1's
    statistics changes the adapted predictions; state_dict carries the copies and restores
    them."""
    algo = _maml(per_step_bn=True, bn_policy="running_stats")
    _meta_step(algo, _batch())
    sx, sy, qx, _ = (t[0] for t in _batch(seed=2).tensors())
    before = algo.predict(algo.adapt(sx, sy), qx)
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    with torch.no_grad():
        algo.per_step_bn.get_buffer("step1__1__running_var").mul_(4.0)
    assert not torch.allclose(algo.predict(algo.adapt(sx, sy), qx), before)
    algo.load_state_dict(state)
    torch.testing.assert_close(algo.predict(algo.adapt(sx, sy), qx), before, rtol=0, atol=0)
    metrics = algo.evaluate(_batch(seed=3))
    assert metrics["post/loss"].shape == (3,) and torch.isfinite(metrics["post/loss"]).all()


def test_per_step_bn_needs_batch_norm() -> None:
    with pytest.raises(ValueError, match="algo.per_step_bn=true needs a model with BatchNorm"):
        MAML(
            nn.Linear(2, 2),
            task_type="regression",
            inner_lr=0.1,
            inner_steps=2,
            eval_inner_steps=2,
            per_step_bn=True,
        )


# ---------------------------------------------------------------- derivative-order annealing


def test_first_order_until_n_is_first_order_before_step_n_then_second_order() -> None:
    batch = _batch()
    fo, so = _maml(first_order=True), _maml()
    annealed = _maml(first_order_until=3)
    _meta_step(fo, batch), _meta_step(so, batch)
    for step, reference in ((0, fo), (2, fo), (3, so), (50, so)):
        _meta_step(annealed, batch, step=step)
        ref, got = _grads(reference), _grads(annealed)
        for n, g in ref.items():
            assert torch.equal(got[n], g), (step, n)
    assert any(not torch.equal(_grads(fo)[n], g) for n, g in _grads(so).items())


# --------------------------------------------------------------- config, runner and presets


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.msl_anneal_steps=0"], "algo.msl_anneal_steps must be >= 1, got 0"),
        (["algo.first_order_until=0"], "algo.first_order_until must be >= 1 or null, got 0"),
        (
            ["algo=fomaml", "algo.first_order_until=100"],
            "algo.first_order_until=100 needs second-order MAML",
        ),
        (
            ["dataset=omniglot", "algo=anil", "algo.per_step_bn=true"],
            "algo.per_step_bn=true: MAML\\+\\+ options of algo=maml, not supported by algo=anil",
        ),
        (
            ["dataset=omniglot", "algo.per_step_bn=true", "model.batch_norm=false"],
            "algo.per_step_bn=true needs BatchNorm layers, got model.batch_norm=false",
        ),
    ],
)
def test_bad_options_name_the_key_the_value_and_a_fix(make_config, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(overrides)


def test_algo_mamlpp_is_maml_with_the_options_on_each_can_be_turned_off(make_config) -> None:
    on = make_config(["algo=mamlpp", "dataset=omniglot"]).algo
    assert on.multi_step_loss and on.per_step_bn and on.learn_inner_lr.value == "per_layer_per_step"
    assert on.inner_steps == on.eval_inner_steps == 5 and on.first_order_until is None
    off = make_config(["algo=mamlpp", "dataset=omniglot", "algo.per_step_bn=false"]).algo
    assert not off.per_step_bn and off.multi_step_loss
    # The sinusoid MLP has no BatchNorm: a usage error naming the key, at build time.
    with pytest.raises(ConfigError, match="algo.per_step_bn=true needs a model with BatchNorm"):
        from metarun.runner.build import build_experiment

        build_experiment(make_config(["algo=mamlpp", "device=cpu"]))


PRESETS = {"omniglot_mamlpp_5way_1shot": 5, "omniglot_mamlpp_20way_1shot": 20}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_turn_every_option_on(make_config, preset) -> None:
    run = make_config([f"experiment={preset}"])
    assert options(run)["algo"] == "mamlpp"
    algo = run.algo
    assert algo.multi_step_loss and algo.per_step_bn and not algo.first_order
    assert algo.learn_inner_lr.value == "per_layer_per_step"
    assert algo.first_order_until is not None and algo.first_order_until < run.outer_steps
    assert algo.inner_steps == algo.eval_inner_steps == 5
    assert run.dataset.n_way == PRESETS[preset] and run.dataset.k_shot == 1
    assert run.name == preset.replace("omniglot_mamlpp", "mamlpp_omniglot")


SINUSOID_MAMLPP = [
    "algo.inner_steps=3",
    "algo.multi_step_loss=true",
    "algo.msl_anneal_steps=8",
    "algo.learn_inner_lr=per_layer_per_step",
    "algo.first_order_until=4",
    "algo.task_batching=loop",  # under auto each run would time its own choice
    "outer_steps=12",
    "save.every=0",
    "eval.every=0",
]


def test_resume_mid_run_gives_the_parameters_of_an_uninterrupted_run(train, tmp_path, monkeypatch):
    """Stopped after step 5 (between the switch to second order at 4 and the end of the
    multi-step loss annealing at 8) and resumed: the parameters of 12 steps in one go; the
    runner gave the algorithm each step number."""
    seen: list[int] = []
    original_set_step = MAML.set_step

    def record(self, step):
        seen.append(step)
        original_set_step(self, step)

    monkeypatch.setattr(MAML, "set_step", record)
    once = train(tmp_path / "once", SINUSOID_MAMLPP)
    assert once.step == 12 and seen[-12:] == list(range(12))
    with sigterm_after(5):
        cut = train(tmp_path / "cut", SINUSOID_MAMLPP)
    assert cut.stopped_by == "SIGTERM" and cut.step == 5
    resumed = train(tmp_path / "cut", [*SINUSOID_MAMLPP, "resume=true"])
    assert resumed.step == 12 and seen[-7:] == list(range(5, 12))
    a = load_checkpoint(tmp_path / "once/checkpoints/last.pt")["algorithm"]
    b = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["algorithm"]
    assert a.keys() == b.keys() and any(k.startswith("step_lrs.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


OMNIGLOT_DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data")) / "omniglot"


@pytest.mark.skipif(
    not list(OMNIGLOT_DATA.glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_omniglot_with_every_option_on_learns_beyond_chance(make_config, tmp_path, monkeypatch):
    """The 5-way 1-shot preset shrunk to CI size (strided convs of 12 filters, 2 inner steps,
    30 outer steps with the multi-step loss annealed over 15 and second order from step 15)
    through the runner on the minimal splits: test accuracy well above chance (52% measured)."""
    monkeypatch.setenv("METARUN_DATA", str(OMNIGLOT_DATA.parent))
    args = [
        "experiment=omniglot_mamlpp_5way_1shot",
        "dataset.split=random",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.k_query=2",
        "model.hidden=12",
        "model.max_pool=false",
        "algo.inner_lr=0.4",
        "algo.inner_steps=2",
        "algo.eval_inner_steps=2",
        "algo.msl_anneal_steps=15",
        "algo.first_order_until=15",
        "algo.task_batching=loop",
        "meta_batch_size=4",
        "meta_optimizer.lr=0.005",
        "meta_optimizer.schedule=constant",
        "outer_steps=30",
        "eval.every=0",
        "eval.num_tasks=50",
        "eval.batch_size=25",
        "log.every=10",
        "log.progress=false",
        "save.every=0",
        "device=cpu",
    ]
    summary = api.run(make_config(args), tmp_path / "run", overrides=args)
    accuracy = summary.results["test"]["metrics"]["accuracy"]
    assert accuracy["mean"] - accuracy["ci95"] > 1 / 5 + 0.1


@pytest.mark.parametrize("bn_policy", ["batch_stats", "running_stats"])
def test_curve_of_one_adaptation_equals_each_evaluation(bn_policy: str) -> None:
    """Evaluation's curve reads one adaptation along the way: after each step count, bit for
    bit what a separate evaluation with that many steps gives, per-step rates and BatchNorm
    copies included (beyond the training steps the last copy serves)."""
    algo = _maml(**ALL_ON, bn_policy=bn_policy, inner_steps=2, eval_inner_steps=4)
    with torch.no_grad():  # per-step copies unlike the model's own, as after meta-training
        for i, p in enumerate(algo.per_step_bn.affine.values()):
            p.add_(0.1 * (i + 1))
    batch = _batch(tasks=2)
    with algo.eval_mode():
        for i in range(len(batch)):
            sx, sy, qx, _ = (t[i] for t in batch.tensors())
            pre, outs = algo.evaluate_task_curve(sx, sy, qx, [0, 1, 3, 4])
            for k, out in zip([0, 1, 3, 4], outs):
                alone_pre, alone = algo.evaluate_task(sx, sy, qx, k)
                assert torch.equal(out, alone), k
                assert torch.equal(pre, alone_pre)
            assert not torch.equal(outs[0], outs[-1])
