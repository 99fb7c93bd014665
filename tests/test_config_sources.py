"""Where each value comes from: every algorithm x dataset pair the registry accepts adapts with
settings chosen for it or says which are generic, and MAML's relatives adapt alike on the same
data unless told otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metarun import registry
from metarun.cli import config_dir
from metarun.config import validate
from metarun.config.provenance import adaptation_report, cli_keys, presets_for
from metarun.spec.bases import _fits

PAIRS = [
    (a, d)
    for a, algo in registry.options("algo").items()
    for d, dataset in registry.options("dataset").items()
    if _fits(algo.schema, dataset.schema)
]
# First-order MAML is a flag and ANIL's paper keeps MAML's settings: same inner loop as MAML.
MAML_ALIKE = ("maml", "fomaml", "anil")


def _report(compose_cfg, overrides):
    cfg = compose_cfg(overrides)
    hydra = cfg.hydra
    report = adaptation_report(cfg, hydra.runtime.choices, list(hydra.overrides.task), config_dir())
    return cfg, report


def _dataset_file(name: str) -> dict:
    return yaml.safe_load((config_dir() / "dataset" / f"{name}.yaml").read_text())


@pytest.mark.parametrize(("algo", "dataset"), PAIRS, ids=lambda v: str(v))
def test_every_pair_traces_its_adaptation_settings(compose_cfg, algo, dataset):
    cfg, report = _report(compose_cfg, [f"algo={algo}", f"dataset={dataset}"])
    validate(cfg)  # the pair composes into a valid run
    schema = type(validate(cfg).algo)
    expected = {f"algo.{k}" for k in schema.adaptation_keys if k in cfg.algo}
    assert expected <= {s.key for s in report.settings}
    for setting in report.settings:
        assert setting.source, setting
    warning = report.warning()
    if report.generic:
        for setting in report.generic:
            assert setting.key in warning
        presets = presets_for(config_dir(), algo, dataset)
        for preset in presets:
            assert f"experiment={preset}" in warning
        if not presets:
            assert "set them on the command line" in warning
    else:
        assert warning is None


def test_maml_relatives_adapt_alike_on_every_dataset(make_config):
    for dataset in registry.options("dataset"):
        runs = {}
        for algo in MAML_ALIKE:
            a, d = registry.get("algo", algo).schema, registry.get("dataset", dataset).schema
            if _fits(a, d):
                runs[algo] = make_config([f"algo={algo}", f"dataset={dataset}"]).algo
        if not runs:
            continue
        loops = {
            algo: (run.inner_lr, run.inner_steps, run.eval_inner_steps)
            for algo, run in runs.items()
        }
        assert len(set(loops.values())) == 1, (dataset, loops)
        # ... and it is the one the dataset file chose (where it chose one).
        adapt = _dataset_file(dataset).get("adapt")
        if adapt:
            inner_lr, inner_steps, eval_steps = next(iter(loops.values()))
            assert (inner_lr, inner_steps) == (adapt["inner_lr"], adapt["inner_steps"])
            assert eval_steps == adapt.get("eval_inner_steps", adapt["inner_steps"])
        # Meta-SGD's rates start from the data's rate; its steps are its paper's.
        if "metasgd" in registry.options("algo") and "maml" in runs:
            metasgd = make_config(["algo=metasgd", f"dataset={dataset}"]).algo
            assert metasgd.inner_lr == runs["maml"].inner_lr
            assert (metasgd.inner_steps, metasgd.eval_inner_steps) == (1, 1)


def test_first_order_maml_and_anil_on_tieredimagenet_adapt_as_maml(make_config):
    """The case that was silently 1+1 steps against MAML's 5+10."""
    adapt = _dataset_file("tieredimagenet")["adapt"]
    for algo in MAML_ALIKE:
        run = make_config([f"algo={algo}", "dataset=tieredimagenet"])
        assert run.algo.inner_steps == adapt["inner_steps"] > 1, algo
        assert run.algo.eval_inner_steps == adapt["eval_inner_steps"] > 1, algo
    # The user still decides.
    run = make_config(["algo=fomaml", "dataset=tieredimagenet", "algo.inner_steps=2"])
    assert (run.algo.inner_steps, run.algo.eval_inner_steps) == (2, adapt["eval_inner_steps"])


def test_sources_name_the_command_line_the_preset_and_the_dataset_file(compose_cfg):
    _, report = _report(compose_cfg, ["dataset=omniglot", "algo.inner_steps=2"])
    source = {s.key: s.source for s in report.settings}
    assert source["algo.inner_steps"] == "the command line"
    assert source["algo.inner_lr"] == "conf/dataset/omniglot.yaml (adapt.inner_lr)"
    assert source["meta_batch_size"] == "conf/dataset/omniglot.yaml"
    assert source["dataset.k_shot"] == "dataset=omniglot's default"
    assert report.warning() is None

    _, report = _report(compose_cfg, ["experiment=omniglot_20way_1shot"])
    source = {s.key: s.source for s in report.settings}
    assert source["algo.inner_lr"] == "experiment=omniglot_20way_1shot (adapt.inner_lr)"
    assert source["dataset.n_way"] == "experiment=omniglot_20way_1shot"

    _, report = _report(compose_cfg, ["algo=metasgd", "dataset=omniglot"])
    source = {s.key: s.source for s in report.settings}
    assert source["algo.inner_steps"].startswith("algo=metasgd's default, Li et al. 2017")
    assert report.warning() is None


def test_generic_settings_are_named_with_the_presets_that_hold_the_papers(compose_cfg):
    _, report = _report(compose_cfg, ["algo=reptile", "dataset=omniglot"])
    generic = {s.key for s in report.generic}
    assert generic == {"algo.inner_batch_size", "algo.eval_inner_batch_size"}
    assert "experiment=omniglot_reptile_5way_1shot" in report.warning()

    _, report = _report(compose_cfg, ["algo=mwn", "dataset=cifar10_lt"])
    assert [s.key for s in report.generic] == ["algo.weight_net_lr"]
    assert "experiment=cifar10_lt_mwn" in report.warning()
    # The preset sets it: nothing generic.
    _, report = _report(compose_cfg, ["experiment=cifar10_lt_mwn"])
    assert report.warning() is None


def test_cli_keys_strip_hydra_prefixes():
    assert cli_keys(["+algo.foo=1", "~seed", "++algo.inner_lr=0.1", "algo=maml"]) == {
        "algo.foo",
        "seed",
        "algo.inner_lr",
        "algo",
    }


def test_the_report_and_its_warning_go_to_metarun_log(tmp_path, tiny):
    """Reptile's defaults were chosen for Omniglot: on sinusoid they are generic, said at
    start-up on the console and in the run's log."""
    run_dir = tmp_path / "run"
    metarun = str(Path(sys.executable).with_name("metarun"))
    result = subprocess.run(
        [metarun, "algo=reptile", *tiny, "outer_steps=1", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    log = (run_dir / "metarun.log").read_text()
    assert "adaptation settings of algo=reptile on dataset=sinusoid:" in log
    assert "algo.inner_steps = 5" in log
    assert "generic defaults, not chosen for algo=reptile on dataset=sinusoid" in log
    assert "no preset holds settings for this pair" in log
