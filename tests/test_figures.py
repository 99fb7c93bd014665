"""The pictures of a run: the sinusoid fit (Finn et al. 2017, Fig. 2) and the test metrics against
adaptation steps, as PNGs in the run dir and TensorBoard images; the curve from one pass over the
test tasks; without matplotlib a warning and the tables."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.algorithms.episodic import EpisodicAlgorithm
from metarun.data.fewshot import fixed_tasks
from metarun.runner import api
from metarun.runner.build import build_experiment

FAST = ["eval.every=0", "save.every=0", "algo.eval_inner_steps=3", "eval.figures=true"]


def _tensorboard(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_a_sinusoid_run_draws_the_fit_and_the_adaptation_curve(train, tmp_path):
    summary = train(tmp_path, FAST)
    results = json.loads((tmp_path / "results.json").read_text())
    test, curve = results["test"], results["curve"]
    steps = [point["inner_steps"] for point in curve]
    # On by default for an inner-loop algorithm: before adaptation, one step and the test's 3
    # at least (every step where the algorithm records them along one adaptation).
    assert test["inner_steps"] == 3 and {0, 1, 3} <= set(steps) and steps == sorted(steps)
    # The test is the curve's point at its own steps; step 0 is the model before adaptation.
    assert curve[-1]["loss"] == test["metrics"]["loss"]
    assert curve[0]["loss"] == test["metrics"]["pre_loss"]
    assert summary.results["curve"] == curve

    for name in ("sinusoid_fit", "adaptation_curve"):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = _tensorboard(tmp_path)
    images = acc.Tags()["images"]
    assert {"test_figure/sinusoid_fit", "test_figure/adaptation_curve"} <= set(images)
    fit = acc.Images("test_figure/sinusoid_fit")[-1]
    assert fit.step == summary.step and fit.width > 3 * fit.height  # three task panels side by side
    logged = acc.Scalars("test_curve/loss")
    assert [e.step for e in logged] == steps
    assert [e.value for e in logged] == pytest.approx([p["loss"]["mean"] for p in curve])


def test_figures_can_be_turned_off(train, tmp_path):
    train(tmp_path, [*FAST, "eval.figures=false", "log.tensorboard=false"])
    assert not (tmp_path / "figures").exists()
    assert json.loads((tmp_path / "results.json").read_text())["curve"]  # still measured


@pytest.mark.parametrize(
    "algo",
    [
        ["algo=maml"],
        ["algo=metasgd", "algo.learn_inner_lr=per_param"],
        # MAML++'s step-by-step loop: per-step rates and the multi-step loss (an MLP has no
        # BatchNorm; test_mamlpp checks the per-step BatchNorm copies).
        ["algo=mamlpp", "algo.per_step_bn=false", "algo.inner_steps=2"],
        ["algo=anil"],
        ["algo=reptile"],
        ["algo=imaml"],
    ],
    ids=lambda a: a[0].partition("=")[2],
)
def test_the_curve_of_one_pass_equals_one_evaluation_per_step_count(make_config, algo):
    """The contract of ``evaluate_task_curve`` (the default or an algorithm's one-pass
    override): bit-for-bit the metrics of ``evaluate`` at each step count."""
    config = make_config([*algo, "algo.eval_inner_steps=3", "device=cpu"])
    experiment = build_experiment(config)
    algorithm = experiment.algorithm
    assert isinstance(algorithm, EpisodicAlgorithm)
    (batch,) = fixed_tasks(experiment.tasks.test, 3, 3, seed=5)
    steps = algorithm.curve_steps(None)
    assert {0, 1, 3} <= set(steps) and max(steps) == 3
    curve = algorithm.evaluate_curve(batch, steps)
    assert list(curve) == steps
    for k in steps:
        alone = algorithm.evaluate(batch, max(k, 1))
        assert curve[k].keys() == alone.keys() == {"pre/loss", "post/loss"}
        # After 0 steps: the model before adaptation.
        post = alone["pre/loss" if k == 0 else "post/loss"]
        expected = {"pre/loss": alone["pre/loss"], "post/loss": post}
        for key, values in expected.items():
            torch.testing.assert_close(curve[k][key], values, rtol=0, atol=0)
    # The curve moves: adaptation changes the query loss.
    assert not torch.equal(curve[0]["post/loss"], curve[3]["post/loss"])


def test_no_default_curve_without_inner_steps(make_config):
    protonets = build_experiment(
        make_config(["algo=protonets", "dataset=omniglot", "device=cpu"]), with_data=False
    )
    assert protonets.algorithm.curve_steps(None) == []
    maml = build_experiment(make_config(["device=cpu"]), with_data=False).algorithm
    assert maml.curve_steps(0) == [] and maml.curve_steps(None)[0] == 0


def test_without_matplotlib_a_run_warns_and_keeps_the_tables(
    monkeypatch, make_config, tiny, tmp_path, caplog
):
    # None in sys.modules: `import matplotlib` raises ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    args = [*tiny, *FAST]
    with caplog.at_level(logging.WARNING, logger="metarun.runner.results"):
        summary = api.run(make_config(args), tmp_path, overrides=args)
    messages = [r.getMessage() for r in caplog.records]
    warnings = [m for m in messages if "matplotlib is not installed" in m]
    assert len(warnings) == 1 and "pip install 'metarun[plot]'" in warnings[0]
    assert not (tmp_path / "figures").exists()
    assert summary.results["curve"]
    acc = _tensorboard(tmp_path)
    assert not acc.Tags()["images"]
    assert "test_figure/adaptation_curve/text_summary" in acc.Tags()["tensors"]
