"""algo=metasgd: MAML with per-parameter learned inner rates, under its own name in configs,
checkpoints, resume and mode=eval."""

from __future__ import annotations

import json

import pytest
import torch

import metarun
from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGDConfig
from metarun.config import ConfigError, InnerLR, options
from metarun.runner import api
from metarun.runner.checkpoint import load_checkpoint


@pytest.fixture
def run(make_config, tiny):
    """``run(run_dir, overrides)``: a tiny sinusoid run, as the CLI would do it."""

    def _run(run_dir, overrides=()) -> api.RunSummary:
        args = [*tiny, *overrides]
        return api.run(make_config(args), run_dir, overrides=args)

    return _run


def test_algo_metasgd_composes_with_per_param_rates(make_config) -> None:
    run = make_config(["algo=metasgd"])
    assert type(run.algo) is MetaSGDConfig and run.algo.learn_inner_lr is InnerLR.per_param
    assert options(run)["algo"] == "metasgd" and run.name == "metasgd_sinusoid"
    omniglot = make_config(["algo=metasgd", "dataset=omniglot"])
    assert (omniglot.algo.inner_lr, omniglot.algo.inner_steps, omniglot.algo.eval_inner_steps) == (
        0.4,
        1,
        1,
    )
    with pytest.raises(ConfigError, match="algo.learn_inner_lr must be per_param for algo=metasgd"):
        make_config(["algo=metasgd", "algo.learn_inner_lr=scalar"])


def test_trains_its_rates_resumes_exactly_and_evaluates(run, tmp_path) -> None:
    once = run(tmp_path / "once", ["algo=metasgd", "save.every=0"])
    assert once.step == 6
    state = load_checkpoint(tmp_path / "once/checkpoints/last.pt")
    assert state["options"]["algo"] == "metasgd"
    rates = {k: v for k, v in state["algorithm"].items() if k.startswith("inner_lrs.")}
    # One elementwise rate per weight of the MLP, meta-learned away from their initial 0.01.
    assert set(rates) == {
        f"inner_lrs.layers__{i}__{w}" for i in (0, 2, 4) for w in ("weight", "bias")
    }
    assert all(not torch.allclose(r, torch.full_like(r, 0.01)) for r in rates.values())
    record = json.loads((tmp_path / "once/metrics.jsonl").read_text().splitlines()[0])
    assert record["inner_lr/hypergrad_norm"] > 0

    # 3 steps, then resume to 6: the same weights and rates as 6 in one go.
    run(tmp_path / "twice", ["algo=metasgd", "save.every=0", "outer_steps=3"])
    run(tmp_path / "twice", ["algo=metasgd", "save.every=0", "resume=true"])
    resumed = load_checkpoint(tmp_path / "twice/checkpoints/last.pt")["algorithm"]
    assert resumed.keys() == state["algorithm"].keys()
    for key, value in state["algorithm"].items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)

    # mode=eval reproduces the final test, with or without repeating algo=metasgd.
    checkpoint = tmp_path / "once/checkpoints/last.pt"
    for i, algo in enumerate(([], ["algo=metasgd"])):
        evaluated = run(tmp_path / f"eval{i}", [*algo, "mode=eval", f"checkpoint={checkpoint}"])
        assert evaluated.results["test"]["metrics"] == once.results["test"]["metrics"]

    learner = metarun.load(checkpoint)
    assert isinstance(learner.algorithm, MAML) and learner.algorithm.inner_lrs is not None
    assert "'algo': 'metasgd'" in repr(learner)
