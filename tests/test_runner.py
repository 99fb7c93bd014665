"""Runner tests through Hydra's compose API and the train / eval / load functions (in-process)."""

from __future__ import annotations

import json
import math
import re
import signal

import pytest
import torch
from helpers import sigterm_after
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import metarun
from metarun.config import ConfigError, RunConfig
from metarun.runner import api
from metarun.runner.build import build_experiment
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.evaluate import Stat

OMNIGLOT_TINY = [
    "dataset=omniglot",
    "dataset.k_query=2",
    "model.hidden=4",
    "meta_batch_size=2",
    "algo.eval_inner_steps=1",
]


def _tags(run_dir) -> set[str]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_train_writes_metrics_checkpoints_results_and_tensorboard(train, tmp_path):
    summary = train(tmp_path, [])
    assert summary.step == 6 and summary.stopped_by is None
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"last.pt", "best.pt"}

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 6]  # log.every=2, eval.every=3, test
    assert {"train/meta_loss", "hypergrad/norm", "time/sec_per_step"} <= records[0].keys()
    # One tag per quantity: the outer objective (the post-adaptation query loss) once.
    assert not {"train/query_loss", "train/post_loss"} & records[0].keys()
    assert {"val/loss", "val/pre_loss"} <= records[1].keys()
    assert {"test/loss", "test/loss_ci95", "test/pre_loss"} <= records[-1].keys()

    results = json.loads((tmp_path / "results.json").read_text())
    loss = results["test"]["metrics"]["loss"]
    assert loss["n"] == 6 and loss["mean"] > 0 and loss["ci95"] > 0
    assert results["test"]["inner_steps"] == 1 and results["best"]["metric"] == "val/loss"
    assert results["config"]["algo"]["inner_lr"] == 0.01
    assert math.isclose(loss["mean"], records[-1]["test/loss"])

    tags = _tags(tmp_path)
    assert {
        "train/meta_loss",
        "train/pre_loss",
        "val/loss",
        "test/loss",
        "hypergrad/norm",
        "hypergrad/layers.0.weight",
        "time/sec_per_step",
    } <= tags
    text = summary.format()
    assert (
        "test loss:" in text and "± " in text and f"tensorboard --logdir {tmp_path / 'tb'}" in text
    )


def test_classification_tags(train, tmp_path, fake_omniglot):
    summary = train(tmp_path, OMNIGLOT_TINY)
    tags = _tags(tmp_path)
    assert {
        "train/accuracy",
        "train/pre_accuracy",
        "val/accuracy",
        "val/loss",
        "test/accuracy",
        "test/accuracy_ci95",
        "test/pre_accuracy",
        "hypergrad/norm",
    } <= tags
    assert any(t.startswith("hparam/") for t in tags)  # add_hparams at the end
    accuracy = summary.results["test"]["metrics"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["n"] == 6
    assert summary.results["best"]["metric"] == "val/accuracy"
    assert "test accuracy:" in summary.format()


@pytest.mark.parametrize(
    "preset",
    [
        "sinusoid",
        "omniglot_5way_1shot",
        "omniglot_5way_5shot",
        "omniglot_20way_1shot",
        "omniglot_20way_5shot",
    ],
)
def test_every_preset_runs_a_couple_of_steps(train, tmp_path, fake_omniglot, preset):
    """Smoke: each paper preset, shrunk (2 steps, tiny model; Omniglot-shaped random data)."""
    small = ["outer_steps=2", "eval.every=2", "eval.val_tasks=2", "eval.num_tasks=2"]
    if preset == "sinusoid":
        small += ["eval.curve_steps=[1,2]"]
    else:
        small += ["model.hidden=2", "dataset.k_query=1", "algo.eval_inner_steps=1"]
    summary = train(tmp_path, [f"experiment={preset}", *small])
    assert summary.step == 2 and summary.results["test"]["metrics"]["loss"]["n"] == 2
    if preset == "sinusoid":
        assert [c["inner_steps"] for c in summary.results["curve"]] == [1, 2]
        assert "test_curve/loss" in _tags(tmp_path)


def _params(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["algorithm"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_is_exact(train, tmp_path):
    """20 steps in one go == 10 steps, then resume to 20 (CPU float32), with or without
    prefetching."""
    overrides = ["outer_steps=20", "save.every=0", "prefetch=2"]
    # Synchronous sampling here, prefetching (2 batches ahead) below: the same tasks either way.
    train(tmp_path / "once", [*overrides, "prefetch=0"])
    train(tmp_path / "twice", ["outer_steps=10", "save.every=0", "prefetch=2"])
    first_half = _params(tmp_path / "twice" / "checkpoints" / "last.pt")
    summary = train(tmp_path / "twice", [*overrides, "resume=true"])
    assert summary.step == 20
    once, twice = (
        _params(tmp_path / "once/checkpoints/last.pt"),
        _params(tmp_path / "twice/checkpoints/last.pt"),
    )
    _assert_same(once, twice)
    assert not torch.equal(first_half["model.layers.0.weight"], twice["model.layers.0.weight"])
    # Adam's state too, so later steps stay identical.
    opt_once = load_checkpoint(tmp_path / "once/checkpoints/last.pt")["meta_opt"]
    opt_twice = load_checkpoint(tmp_path / "twice/checkpoints/last.pt")["meta_opt"]
    assert opt_once["state"][0]["step"] == opt_twice["state"][0]["step"] == 20
    # The resumed run's log continues where the first stopped, without duplicates.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "twice/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 20


def test_sigterm_saves_a_checkpoint_and_resume_continues(train, tmp_path, monkeypatch):
    overrides = ["outer_steps=12", "save.every=0", "eval.every=0"]
    train(tmp_path / "once", overrides)

    with sigterm_after(5):
        summary = train(tmp_path / "cut", overrides)
    assert summary.stopped_by == "SIGTERM" and summary.step == 5
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == 5
    assert "resume=true" in summary.resume_command
    assert f"hydra.run.dir={tmp_path / 'cut'}" in summary.resume_command
    assert "resume with:" in summary.format()
    assert not (tmp_path / "cut" / "results.json").read_text().count('"test"')
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = train(tmp_path / "cut", [*overrides, "resume=true"])
    assert resumed.step == 12 and resumed.stopped_by is None
    _assert_same(
        _params(tmp_path / "once/checkpoints/last.pt"),
        _params(tmp_path / "cut/checkpoints/last.pt"),
    )


def test_task_batching_auto_is_measured_saved_and_restored(train, tmp_path, caplog):
    caplog.set_level("INFO", logger="metarun.algorithms.autotune")
    overrides = ["algo.task_batching=auto", "outer_steps=4", "save.every=0", "eval.every=0"]
    train(tmp_path, overrides)
    assert "task_batching=auto chose" in caplog.text
    last = tmp_path / "checkpoints" / "last.pt"
    chosen = load_checkpoint(last)["algorithm_extra"]["task_batching"]
    assert chosen["mode"] in ("loop", "vmap")
    caplog.clear()
    train(tmp_path, [*overrides, "outer_steps=6", "resume=true"])
    assert "task_batching=auto chose" not in caplog.text  # the checkpoint's choice is reused
    assert load_checkpoint(last)["algorithm_extra"]["task_batching"] == chosen


def test_task_batching_auto_logs_overrides_that_repeat_the_run(train, tmp_path, caplog):
    caplog.set_level("INFO", logger="metarun.algorithms.autotune")
    overrides = ["outer_steps=4", "save.every=0", "eval.every=0"]
    train(tmp_path / "auto", [*overrides, "algo.task_batching=auto"])
    found = re.search(
        r"bit for bit: (algo\.task_batching=\S+ algo\.task_chunk_size=\S+)", caplog.text
    )
    assert found is not None, caplog.text
    train(tmp_path / "pinned", [*overrides, *found.group(1).split()])
    _assert_same(
        _params(tmp_path / "auto/checkpoints/last.pt"),
        _params(tmp_path / "pinned/checkpoints/last.pt"),
    )


def test_loop_with_checkpointed_inner_steps_matches_vmap(train, tmp_path):
    loop = ["algo.task_batching=loop", "algo.checkpoint_inner=true", "algo.inner_steps=2"]
    train(tmp_path / "loop", loop)
    train(tmp_path / "vmap", ["algo.inner_steps=2"])
    a, b = (
        _params(tmp_path / "loop/checkpoints/last.pt"),
        _params(tmp_path / "vmap/checkpoints/last.pt"),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # auto cannot checkpoint under vmap, so it runs the loop: the very same computation.
    train(tmp_path / "auto", [*loop[1:], "algo.task_batching=auto"])
    c = _params(tmp_path / "auto/checkpoints/last.pt")
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=0)


def test_existing_checkpoint_needs_resume(train, tmp_path):
    train(tmp_path, [])
    with pytest.raises(ConfigError, match="resume must be true to continue the run in"):
        train(tmp_path, [])


def test_eval_mode_reproduces_the_final_test(train, tmp_path):
    trained = train(tmp_path / "train", [])
    checkpoint = tmp_path / "train" / "checkpoints" / "last.pt"
    overrides = ["mode=eval", f"checkpoint={checkpoint}"]
    evaluated = train(tmp_path / "eval", overrides)
    assert evaluated.mode == "eval" and evaluated.step == 6
    assert evaluated.results["test"]["metrics"] == trained.results["test"]["metrics"]
    assert "test/loss" in _tags(tmp_path / "eval")
    # algo.* overrides apply on top of the checkpoint's config; other groups must match.
    more = train(tmp_path / "eval10", [*overrides, "algo.eval_inner_steps=10"])
    assert more.results["test"]["inner_steps"] == 10
    post, pre = (more.results["test"]["metrics"][k]["mean"] for k in ("loss", "pre_loss"))
    assert post < pre
    with pytest.raises(ConfigError, match="algo=fomaml differs from the checkpoint's algo=maml"):
        train(tmp_path / "bad", [*overrides, "algo=fomaml"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tmp_path / "bad", ["mode=eval", f"checkpoint={tmp_path}/no.pt"])


def test_load_adapt_predict(train, tmp_path):
    train(tmp_path, [])
    learner = metarun.load(tmp_path / "checkpoints" / "last.pt")
    assert learner.task_type == "regression" and learner.step == 6
    assert isinstance(learner.config, RunConfig)
    x = torch.linspace(-5, 5, 10).unsqueeze(-1)  # (K, 1)
    y = 2.0 * torch.sin(x - 0.5)
    before = learner.adapt(x, y, steps=0)(x)
    with torch.no_grad():  # adapt still takes its inner gradients
        predict = learner.adapt(x, y, steps=20)
    after = predict(x)
    assert after.shape == (10, 1) and not after.requires_grad
    assert torch.mean((after - y) ** 2) < torch.mean((before - y) ** 2)
    torch.testing.assert_close(before, learner.model(x))


def test_load_leaves_the_global_rng_alone(train, tmp_path):
    train(tmp_path, [])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    metarun.load(tmp_path / "checkpoints" / "last.pt")
    assert torch.equal(torch.rand(3), expected)


def test_copy_initial_weights_shows_zero_hypergrad(train, tmp_path):
    train(tmp_path, ["algo.copy_initial_weights=true", "algo.learn_inner_lr=scalar"])
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["hypergrad/norm"] == 0.0
    assert "inner_lr/value" in record  # algo.log_scalars()


def test_grad_clip_with_sgd(make_config, tiny, tmp_path):
    """With plain SGD a tiny clipping norm leaves the weights (almost) where they started."""

    def weight_change(run_dir, overrides) -> float:
        args = [
            *tiny,
            "outer_steps=2",
            "meta_optimizer.name=sgd",
            "meta_optimizer.lr=0.1",
            "eval.every=0",
            *overrides,
        ]
        config = make_config(args)
        initial = build_experiment(config, with_data=False).algorithm.state_dict()
        api.run(config, run_dir)
        final = _params(run_dir / "checkpoints" / "last.pt")
        return sum(float((final[k] - initial[k]).abs().sum()) for k in initial)

    assert weight_change(tmp_path / "clipped", ["grad_clip=1e-9"]) < 1e-6
    assert weight_change(tmp_path / "free", []) > 1e-3
    # hypergrad/norm is measured before clipping.
    record = json.loads((tmp_path / "clipped" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["hypergrad/norm"] > 1e-3


def test_stat_mean_and_ci():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    stat = Stat.of(values)
    assert stat.n == 4 and stat.mean == 2.5
    assert math.isclose(stat.ci95, 1.96 * float(values.double().std()) / math.sqrt(4))
    assert str(stat) == f"2.5000 ± {stat.ci95:.4f}"


def _logged(run_dir, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_step_schedule_sets_each_outer_steps_rate(train, tmp_path):
    overrides = [
        "log.every=1",
        "meta_optimizer.lr=0.01",
        "meta_optimizer.schedule=step",
        "meta_optimizer.milestones=[2,4]",
        "meta_optimizer.gamma=0.5",
    ]
    train(tmp_path, overrides)
    # Logged at step s (1-based, after the update) is the rate outer step s-1 used.
    expected = {s: 0.01 * 0.5 ** sum(s - 1 >= m for m in (2, 4)) for s in range(1, 7)}
    assert _logged(tmp_path, "train/lr") == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_resumes_exactly(train, tmp_path):
    schedule = ["meta_optimizer.schedule=cosine", "meta_optimizer.min_lr=0.0001", "log.every=1"]
    overrides = [*schedule, "outer_steps=8", "save.every=0"]
    train(tmp_path / "once", overrides)
    lrs = _logged(tmp_path / "once", "train/lr")
    expected = {
        s: 0.0001 + (0.001 - 0.0001) * 0.5 * (1 + math.cos(math.pi * (s - 1) / 8))
        for s in range(1, 9)
    }
    assert lrs == pytest.approx(expected, rel=1e-12)
    with sigterm_after(4):
        train(tmp_path / "cut", overrides)
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == 4
    train(tmp_path / "cut", [*overrides, "resume=true"])
    _assert_same(
        _params(tmp_path / "once/checkpoints/last.pt"),
        _params(tmp_path / "cut/checkpoints/last.pt"),
    )
    assert _logged(tmp_path / "cut", "train/lr") == pytest.approx(expected, rel=1e-12)
