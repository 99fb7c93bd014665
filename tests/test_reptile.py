"""Reptile: the outer update against a hand-written float64 reference, annealing and exact resume,
transductive vs non-transductive evaluation, the presets, and a learning run on real Omniglot."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SMOKE_RUN, scalar_tags, sigterm_after
from hydra.errors import ConfigCompositionException
from torch import nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.reptile import SUPPORT_KEY, Reptile, ReptileConfig, minibatch_indices
from metarun.config import ConfigError, options
from metarun.runner import api
from metarun.runner.build import build_experiment, build_meta_optimizer
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.evaluate import evaluate_fixed
from metarun.tasks import TaskBatch

DT = torch.float64
PRESETS = [
    "omniglot_reptile_5way_1shot",
    "omniglot_reptile_5way_5shot",
    "omniglot_reptile_20way_1shot",
]


def _bn_model() -> nn.Module:
    """A tiny classifier whose batch norm makes each output depend on the rest of its batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT)


def _batch(tasks: int = 3, support: int = 6, query: int = 5, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        support_x=torch.randn(tasks, support, 4, generator=g, dtype=DT),
        support_y=torch.randint(0, 3, (tasks, support), generator=g),
        query_x=torch.randn(tasks, query, 4, generator=g, dtype=DT),
        query_y=torch.randint(0, 3, (tasks, query), generator=g),
    )


def _reptile(model: nn.Module | None = None, **kw) -> Reptile:
    args = dict(task_type="classification", inner_lr=0.05, inner_steps=4, eval_inner_steps=3)
    args.update(kw)
    return Reptile(model if model is not None else _bn_model(), **args).to(DT)


def _reference_update(
    model: nn.Module,
    batch: TaskBatch,
    orders: torch.Tensor | None,
    *,
    inner: str,
    inner_lr: float,
    steps: int,
    eps: float,
) -> dict[str, torch.Tensor]:
    """Reptile by hand: for each task a copy of the model trained by a new torch.optim optimizer
    on the given mini-batches (batch norm in training mode: batch statistics), then
    theta + eps * (mean phi - theta)."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phis = []
    for i in range(len(batch)):
        sx, sy = batch.support_x[i], batch.support_y[i]
        task_model = copy.deepcopy(model).train()
        if inner == "adam":
            opt = torch.optim.Adam(
                task_model.parameters(), lr=inner_lr, betas=(0.0, 0.999), eps=1e-8
            )
        else:
            opt = torch.optim.SGD(task_model.parameters(), lr=inner_lr)
        for t in range(steps):
            idx = torch.arange(sx.shape[0]) if orders is None else orders[i, t]
            opt.zero_grad()
            F.cross_entropy(task_model(sx[idx]), sy[idx]).backward()
            opt.step()
        phis.append({n: p.detach() for n, p in task_model.named_parameters()})
    mean_phi = {n: torch.stack([phi[n] for phi in phis]).mean(0) for n in theta}
    return {n: theta[n] + eps * (mean_phi[n] - theta[n]) for n in theta}


# --------------------------------------------------------------------------- the outer update


@pytest.mark.parametrize("inner", ["adam", "sgd"])
@pytest.mark.parametrize("inner_batch_size", [None, 4], ids=["full_batch", "minibatch4"])
def test_outer_update_matches_hand_written_reference(inner, inner_batch_size):
    """The runner's SGD step (lr = eps) on the pseudo-gradient is Reptile's interpolation; with
    mini-batches of 4 from 6 support examples, batches straddle two passes."""
    algo = _reptile(inner_optimizer=inner, inner_batch_size=inner_batch_size)
    assert isinstance(algo, MetaAlgorithm)
    batch = _batch()
    eps = 0.7
    orders = algo.train_orders(batch)
    expected = _reference_update(
        algo.model, batch, orders, inner=inner, inner_lr=0.05, steps=4, eps=eps
    )
    meta_opt = torch.optim.SGD(algo.meta_parameters(), lr=eps)
    meta_opt.zero_grad(set_to_none=True)
    metrics = algo.meta_train_step(batch)
    meta_opt.step()
    for name, p in algo.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-10, atol=1e-12)
    assert "train/meta_loss" in metrics and "train/query_loss" not in metrics
    assert int(algo.outer_step) == 1


def test_meta_parameters_are_the_model_weights_and_runner_builds_plain_sgd(make_config):
    algo = _reptile()
    assert {id(p) for p in algo.meta_parameters()} == {id(p) for p in algo.model.parameters()}
    run = make_config(["algo=reptile", "meta_optimizer.name=sgd", "meta_optimizer.lr=1.0"])
    opt = build_meta_optimizer(run.meta_optimizer, algo.meta_parameters())
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0


def test_inner_optimizer_state_is_fresh_for_every_task():
    """A task's adapted weights do not depend on the tasks adapted before it: the pseudo-gradient
    of a meta-batch is the same whatever the order of its tasks (Adam's moments would carry
    over otherwise)."""
    batch = _batch(tasks=3)
    grads = []
    for perm in ([0, 1, 2], [2, 0, 1]):
        algo = _reptile(inner_optimizer="adam")
        permuted = TaskBatch(*(t[perm] for t in batch.tensors()))
        algo.meta_train_step(permuted)
        grads.append([p.grad.clone() for p in algo.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # And one task adapted alone gives the weights it gets inside the meta-batch.
    algo = _reptile(inner_optimizer="adam")
    sx, sy = batch.support_x[1], batch.support_y[1]
    first = algo._adapt(sx, sy, None, 4)
    algo._adapt(batch.support_x[0], batch.support_y[0], None, 4)
    again = algo._adapt(sx, sy, None, 4)
    for name in first:
        assert torch.equal(first[name], again[name])


def test_minibatches_are_passes_over_the_support_set_in_random_orders():
    idx = minibatch_indices(2, 6, 4, 6, torch.Generator().manual_seed(0))  # 24 = 4 passes
    assert idx.shape == (2, 6, 4)
    flat = idx.reshape(2, 4, 6)
    for task in flat:
        for one_pass in task:
            assert sorted(one_pass.tolist()) == list(range(6))
    assert not torch.equal(flat[0, 0], flat[0, 1])  # reshuffled every pass


def test_training_does_not_touch_batch_norm_running_statistics():
    algo = _reptile()
    before = {n: b.clone() for n, b in algo.model.named_buffers()}
    algo.meta_train_step(_batch())
    algo.evaluate(_batch())
    for name, buffer in algo.model.named_buffers():
        assert torch.equal(buffer, before[name]), name


# ------------------------------------------------------------------------------- annealing


def test_anneal_factor_is_the_papers_linear_schedule():
    """The paper's train.py: frac_done = i / meta_iters,
    step size = frac_done * final + (1 - frac_done) * initial."""
    algo = _reptile(anneal_steps=4)
    assert [algo.anneal_factor(i) for i in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    to_a_fifth = _reptile(anneal_steps=4, anneal_final=0.2)
    for i in range(5):
        frac = i / 4
        assert to_a_fifth.anneal_factor(i) == pytest.approx(frac * 0.2 + (1 - frac) * 1.0)
    assert _reptile().anneal_factor(10**6) == 1.0  # no annealing


def test_pseudo_gradient_is_scaled_by_the_step_counters_factor():
    batch = _batch()
    constant, annealed = _reptile(inner_batch_size=4), _reptile(inner_batch_size=4, anneal_steps=4)
    assert torch.equal(constant.order_seed, annealed.order_seed)  # same seed: same mini-batches
    for algo in (constant, annealed):
        algo.outer_step.fill_(2)
        algo.meta_train_step(batch)
    for a, b in zip(constant.model.parameters(), annealed.model.parameters()):
        torch.testing.assert_close(b.grad, 0.5 * a.grad, rtol=1e-12, atol=0)
    assert int(annealed.outer_step) == 3
    assert annealed.log_scalars() == {"train/anneal_factor": 0.5}
    assert "outer_step" in annealed.state_dict() and "order_seed" in annealed.state_dict()


REPTILE_SINUSOID = [
    "algo=reptile",
    "meta_optimizer.name=sgd",
    "meta_optimizer.lr=0.5",
    "algo.inner_optimizer=adam",
    "algo.inner_lr=0.01",
    "algo.inner_steps=3",
    "algo.inner_batch_size=4",  # mini-batches drawn from the step counter's generator
    "outer_steps=12",
    "save.every=0",
    "eval.every=0",
]


def test_resume_mid_run_gives_the_parameters_of_an_uninterrupted_run(train, tmp_path, monkeypatch):
    """Stopped by SIGTERM after step 5 and resumed with the same config (annealing over
    ${outer_steps} = 12): the same parameters as 12 steps in one go."""
    once = train(tmp_path / "once", REPTILE_SINUSOID)
    assert once.step == 12
    with sigterm_after(5):
        cut = train(tmp_path / "cut", REPTILE_SINUSOID)
    assert cut.stopped_by == "SIGTERM" and cut.step == 5
    state = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert int(state["algorithm"]["outer_step"]) == 5  # the annealing's clock is checkpointed

    resumed = train(tmp_path / "cut", [*REPTILE_SINUSOID, "resume=true"])
    assert resumed.step == 12
    a = load_checkpoint(tmp_path / "once/checkpoints/last.pt")["algorithm"]
    b = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["algorithm"]
    assert a.keys() == b.keys() and int(b["outer_step"]) == 12
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The annealing was in effect: the last step's factor was 1/12.
    records = [json.loads(r) for r in (tmp_path / "once/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/anneal_factor" in r][-1]
    assert last["step"] == 12 and last["train/anneal_factor"] == pytest.approx(1 / 12)


# ------------------------------------------------------------- transductive or not (evaluation)


def _adapted_pair(transductive: bool) -> tuple[Reptile, dict[str, torch.Tensor], TaskBatch]:
    algo = _reptile(transductive=transductive, eval_inner_batch_size=4)
    batch = _batch(tasks=1, support=6, query=5)
    return algo, algo.adapt(batch.support_x[0], batch.support_y[0]), batch


def test_non_transductive_prediction_of_a_query_ignores_the_other_queries():
    algo, adapted, batch = _adapted_pair(transductive=False)
    sx, qx = batch.support_x[0], batch.query_x[0]
    assert torch.equal(adapted[SUPPORT_KEY], sx)
    out = algo.predict(adapted, qx)
    others = qx.clone()
    others[1:] = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(algo.predict(adapted, others)[0], out[0], rtol=0, atol=1e-12)
    # Each query is predicted in a batch of the support set plus itself.
    weights = {k: v for k, v in adapted.items() if k != SUPPORT_KEY}
    for j in range(qx.shape[0]):
        alone = algo._forward(weights, torch.cat([sx, qx[j : j + 1]]))[-1]
        torch.testing.assert_close(out[j], alone, rtol=1e-12, atol=1e-12)


def test_transductive_prediction_normalises_the_queries_together():
    algo, adapted, batch = _adapted_pair(transductive=True)
    qx = batch.query_x[0]
    assert SUPPORT_KEY not in adapted
    out = algo.predict(adapted, qx)
    torch.testing.assert_close(out, algo._forward(adapted, qx), rtol=0, atol=0)
    others = qx.clone()
    others[1:] = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(algo.predict(adapted, others)[0], out[0])
    # The same adapted weights: only the batches of the predictions differ.
    non_trans, non_adapted, _ = _adapted_pair(transductive=False)
    for name in adapted:
        torch.testing.assert_close(adapted[name], non_adapted[name], rtol=0, atol=0)
    assert not torch.allclose(out, non_trans.predict(non_adapted, qx))


@pytest.mark.parametrize("transductive", [False, True])
def test_evaluate_reports_the_adapted_predictions(transductive):
    algo = _reptile(transductive=transductive, eval_inner_batch_size=4)
    batch = _batch(tasks=3, support=6, query=5)
    metrics = algo.evaluate(batch)
    assert set(metrics) == {"pre/loss", "pre/accuracy", "post/loss", "post/accuracy"}
    for i in range(3):
        adapted = algo.adapt(batch.support_x[i], batch.support_y[i])
        loss = F.cross_entropy(algo.predict(adapted, batch.query_x[i]), batch.query_y[i])
        torch.testing.assert_close(metrics["post/loss"][i], loss.float(), rtol=1e-6, atol=1e-7)
        # Fixed mini-batch order at evaluation: a task's result does not depend on its batch.
        alone = algo.evaluate(batch.task(i))
        assert torch.equal(alone["post/loss"][0], metrics["post/loss"][i])


def test_without_batch_norm_both_modes_predict_the_same():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    batch = _batch(tasks=2)
    results = []
    for transductive in (False, True):
        algo = _reptile(copy.deepcopy(mlp), transductive=transductive)
        results.append(algo.evaluate(batch))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0)


# ------------------------------------------------------------------------ config and presets


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.inner_steps=0"], "algo.inner_steps must be >= 1, got 0"),
        (["algo.inner_lr=0"], "algo.inner_lr must be > 0"),
        (["algo.inner_betas=[0.9]"], "algo.inner_betas must be two numbers in [0, 1)"),
        (["algo.inner_batch_size=0"], "algo.inner_batch_size must be >= 1 or null"),
        (["algo.anneal_steps=0"], "algo.anneal_steps must be >= 1 or null"),
        (["algo.anneal_final=-1"], "algo.anneal_final must be >= 0"),
        (
            ["dataset=omniglot", "dataset.eval_n_way=20"],
            "dataset.eval_n_way must equal dataset.n_way (5) for algo=reptile",
        ),
    ],
)
def test_bad_values_name_the_key(make_config, overrides, message):
    with pytest.raises(ConfigError) as error:
        make_config(["algo=reptile", *overrides])
    assert message in str(error.value)


def test_unknown_inner_optimizer_fails_at_compose(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["algo=reptile", "algo.inner_optimizer=rmsprop"])
    message = f"{info.value}\n{info.value.__cause__}"
    assert "Invalid value 'rmsprop'" in message and "full_key: algo.inner_optimizer" in message


def test_defaults_anneal_over_the_run(make_config):
    run = make_config(["algo=reptile", "outer_steps=345"])
    assert isinstance(run.algo, ReptileConfig) and run.algo.anneal_steps == 345
    assert run.algo.eval_inner_steps == run.algo.inner_steps  # ${.inner_steps}
    assert run.algo.inner_betas == [0.0, 0.999] and run.algo.inner_optimizer.value == "adam"
    assert make_config(["algo=reptile", "algo.anneal_steps=null"]).algo.anneal_steps is None


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_the_readme_commands(make_config, preset):
    """What openai/supervised-reptile's README commands share, as relations between a preset's
    keys. The numbers each file writes (rates, steps, batches, iterations) are read from the
    file and checked against the run by
    tests/test_config.py::test_presets_run_with_the_values_their_files_write."""
    run = make_config([f"experiment={preset}"])
    assert options(run)["algo"] == "reptile"
    assert run.name == preset.replace("omniglot_reptile", "reptile_omniglot")
    ways, shots = (int(n) for n in re.search(r"(\d+)way_(\d+)shot", preset).groups())
    a, d = run.algo, run.dataset
    # --classes, --shots; the code's evaluation holds one example per class out as the query.
    assert (d.n_way, d.eval_k_shot, d.eval_k_query) == (ways, shots, 1)
    assert d.k_shot + d.k_query <= 20  # Omniglot's 20 drawers per character
    # --inner-iters x --inner-batch is one pass over the training task (--train-shots per class).
    assert a.inner_steps * a.inner_batch_size == d.n_way * d.k_shot
    # --meta-step-final 0: the meta step falls linearly to 0 over the whole run.
    assert a.anneal_steps == run.outer_steps and a.anneal_final == 0
    assert run.meta_optimizer.schedule.value == "constant"  # the annealing is Reptile's own
    assert run.model.hidden == 64 and not run.model.max_pool  # the code's 4 x 64-filter conv net
    assert not a.transductive
    assert make_config([f"experiment={preset}", "algo.transductive=true"]).algo.transductive


_tags = scalar_tags


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_a_couple_of_steps(train, tmp_path, fake_omniglot, preset, caplog):
    """Smoke: each preset shrunk (2 steps, a tiny model, 2-step evaluation); TensorBoard gets
    train/meta_loss; no warning about the meta-optimizer (it is Reptile's SGD)."""
    small = [*SMOKE_RUN, "algo.eval_inner_steps=2"]
    caplog.set_level(logging.WARNING, logger="metarun.algorithms.reptile")
    summary = train(tmp_path, [f"experiment={preset}", *small])
    assert summary.step == 2 and summary.results["test"]["metrics"]["accuracy"]["n"] == 2
    assert summary.results["test"]["inner_steps"] == 2
    tags = _tags(tmp_path)
    assert {
        "train/meta_loss",
        "train/accuracy",
        "train/pre_accuracy",
        "train/anneal_factor",
    } <= tags
    assert {"val/accuracy", "test/accuracy", "test/pre_accuracy", "hypergrad/norm"} <= tags
    assert "meta_optimizer" not in caplog.text


def test_eval_mode_tests_a_checkpoint_both_ways_and_load_predicts(train, tmp_path, fake_omniglot):
    """One checkpoint, tested non-transductively (as trained) and with algo.transductive=true;
    metarun.load adapts and predicts."""
    import metarun

    args = [
        "experiment=omniglot_reptile_5way_1shot",
        "outer_steps=2",
        "model.hidden=2",
        "algo.eval_inner_steps=1",
        "eval.every=0",
    ]
    train(tmp_path / "run", args)
    checkpoint = tmp_path / "run/checkpoints/last.pt"
    results = {}
    for transductive in ("false", "true"):
        evaluated = train(
            tmp_path / f"eval_{transductive}",
            # mode=eval takes the checkpoint's options (the CLI adds them), not a preset.
            [
                "algo=reptile",
                "dataset=omniglot",
                *args[1:],
                "mode=eval",
                f"checkpoint={checkpoint}",
                f"algo.transductive={transductive}",
            ],  # fmt: skip
        )
        results[transductive] = evaluated.results["test"]["metrics"]["loss"]["mean"]
        assert evaluated.results["config"]["algo"]["transductive"] == (transductive == "true")
    assert results["false"] != results["true"]
    learner = metarun.load(checkpoint)
    support = torch.rand(5, 1, 28, 28)
    predict = learner.adapt(support, torch.arange(5))
    assert predict(torch.rand(3, 1, 28, 28)).shape == (3, 5)


def test_adam_meta_optimizer_warns_that_the_update_is_not_reptiles(caplog):
    caplog.set_level(logging.WARNING, logger="metarun.algorithms.reptile")
    algo = _reptile(anneal_steps=10)
    algo.attach_optimizer(torch.optim.Adam(algo.meta_parameters(), lr=1e-3))
    assert "meta_optimizer.name=sgd" in caplog.text and "normalises away" in caplog.text
    caplog.clear()
    algo.attach_optimizer(torch.optim.SGD(algo.meta_parameters(), lr=1.0))
    assert caplog.text == ""


# --------------------------------------------------------------------------- real Omniglot

OMNIGLOT_DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data")) / "omniglot"


@pytest.mark.slow
@pytest.mark.skipif(
    not list(OMNIGLOT_DATA.glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_omniglot_minimal_splits_learn_well_beyond_chance(make_config, tmp_path, monkeypatch):
    """150 Reptile steps (5-way, 5 training shots, SGD outer step 1 annealed to 0) through the
    runner on the characters of the two minimal splits (split=random); 1-shot test accuracy
    (non-transductive) well above chance and above what 20 inner steps reach from the initial
    weights."""
    monkeypatch.setenv("METARUN_DATA", str(OMNIGLOT_DATA.parent))
    args = [
        "experiment=omniglot_reptile_5way_1shot",
        "dataset.split=random",
        f"dataset.cache_dir={tmp_path / 'cache'}",  # not next to the shared archives
        "dataset.k_shot=5",
        "dataset.eval_k_query=5",
        "model.hidden=32",
        "algo.inner_lr=0.005",
        "algo.eval_inner_steps=20",
        "outer_steps=150",
        "eval.every=0",
        "eval.num_tasks=100",
        "eval.batch_size=25",
        "log.every=25",
        "log.progress=false",
        "save.every=0",
        "device=cpu",
    ]
    config = make_config(args)
    initial = build_experiment(config)
    baseline = evaluate_fixed(
        initial.algorithm,
        initial.tasks.test,
        num_tasks=100,
        batch_size=25,
        seed=config.eval.test_seed,
        device=initial.device,
    )["post/accuracy"]
    summary = api.run(config, tmp_path / "run", overrides=args)
    accuracy = summary.results["test"]["metrics"]["accuracy"]
    chance = 1 / 5
    assert accuracy["mean"] - accuracy["ci95"] > chance + 0.25
    assert accuracy["mean"] - accuracy["ci95"] > baseline.mean + baseline.ci95
    assert "train/meta_loss" in _tags(tmp_path / "run")
