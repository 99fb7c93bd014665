"""A diverging run stops at the first non-finite meta-loss or meta-gradient (or skips up to
``max_nonfinite_steps`` of them), or at the first meta-loss beyond ``divergence_factor`` times
the loss before training, says which step and which keys to change, exits non-zero and never
writes a checkpoint holding NaN or inf, nor the update of the step beyond the bound."""

from __future__ import annotations

import csv
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import BIN, cli_env, free_port, make_trainer, run_metarun

import metarun
from metarun.algorithms.maml import MAML
from metarun.config import ConfigError
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.trainer import Trainer, TrainingDiverged, nonfinite_entries

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Tiny sinusoid run, checkpoints every 3 steps, no validation (best.pt would be a second file);
# a fixed task batching, so that every meta_train_step call is a training step (auto measures).
ARGS = ["outer_steps=12", "save.every=3", "eval.every=0", "algo.task_batching=vmap"]


@pytest.fixture
def train(train_with):
    return train_with(ARGS)


def _change_steps(monkeypatch, steps: set[int], change) -> None:
    """MAML's meta_train_step, then ``change(algorithm, metrics) -> metrics`` at the outer steps
    in ``steps`` (1-based)."""
    original = MAML.meta_train_step
    calls = [0]

    def meta_train_step(self, batch):
        metrics = original(self, batch)
        calls[0] += 1
        return change(self, metrics) if calls[0] in steps else metrics

    monkeypatch.setattr(MAML, "meta_train_step", meta_train_step)


@pytest.fixture
def poison(monkeypatch):
    """``poison({5, 8})``: outer steps 5 and 8 (1-based) get a NaN meta-loss and meta-gradient,
    as a diverging unroll gives them."""

    def nan(algorithm, metrics):
        for p in algorithm.meta_parameters():
            if p.grad is not None:
                p.grad.fill_(math.nan)
        loss = metrics["train/meta_loss"]
        return {**metrics, "train/meta_loss": torch.full_like(loss, math.nan)}

    return lambda steps: _change_steps(monkeypatch, steps, nan)


@pytest.fixture
def explode(monkeypatch):
    """``explode({8})``: outer step 8 (1-based) reports a meta-loss 1e9 times its own, finite,
    with its finite meta-gradient: a divergence that the non-finite check cannot see."""

    def times_1e9(algorithm, metrics):
        return {**metrics, "train/meta_loss": metrics["train/meta_loss"] * 1e9}

    return lambda steps: _change_steps(monkeypatch, steps, times_1e9)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["algorithm"]


def _assert_finite_and_equal(path: Path, reference: Path, step: int) -> None:
    state = load_checkpoint(path)
    assert state["step"] == step
    assert nonfinite_entries({"a": state["algorithm"], "o": state["meta_opt"]}) == []
    expected = _weights(reference)
    assert state["algorithm"].keys() == expected.keys()
    for key, value in state["algorithm"].items():
        assert torch.equal(value, expected[key]), key


def test_first_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(train, poison, tmp_path):
    train(tmp_path / "ref", ["outer_steps=6"])  # what the diverging run had at step 6
    poison({8})
    with pytest.raises(TrainingDiverged) as info:
        train(tmp_path / "run")
    message = str(info.value)
    assert "non-finite meta-loss or meta-gradient at outer step 8" in message
    assert "train/meta_loss=nan" in message  # the objective, by its tag
    for key in ("meta_optimizer.lr (now 0.001)", "algo.inner_lr (now 0.01)", "grad_clip=10"):
        assert key in message
    assert "max_nonfinite_steps" in message
    last = tmp_path / "run/checkpoints/last.pt"
    assert f"the last good one is {last} (step 6)" in message
    _assert_finite_and_equal(last, tmp_path / "ref/checkpoints/last.pt", step=6)
    assert not (tmp_path / "run/results.json").exists()  # no test of diverged weights


def test_divergence_before_any_checkpoint_writes_none(train, poison, tmp_path):
    poison({2})
    with pytest.raises(TrainingDiverged, match="at outer step 2 .*No checkpoint was written"):
        train(tmp_path, ["grad_clip=5"])
    assert not (tmp_path / "checkpoints").exists()


def test_grad_clip_set_suggests_lowering_it(train, poison, tmp_path):
    poison({1})
    with pytest.raises(TrainingDiverged, match=r"or lower grad_clip \(now 5\)"):
        train(tmp_path, ["grad_clip=5"])


def test_skipping_up_to_max_nonfinite_steps(train, poison, tmp_path):
    poison({2, 5})
    summary = train(tmp_path, ["max_nonfinite_steps=2", "log.every=1"])
    assert summary.step == 12 and math.isfinite(summary.results["test"]["metrics"]["loss"]["mean"])
    state = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert state["nonfinite_steps"] == 2
    assert nonfinite_entries(state["algorithm"]) == []
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows}
    assert 2 not in logged or "train/meta_loss" not in logged[2]  # skipped: nothing averaged
    assert logged[5]["train/nonfinite_steps"] == 2
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_skipped_steps_leave_the_weights_alone(train, poison, tmp_path):
    """A skipped step does not update: with every step from 4 on skipped, the weights after 12
    steps are those after 3."""
    train(tmp_path / "ref", ["outer_steps=3"])
    poison(set(range(4, 13)))
    train(tmp_path / "run", ["max_nonfinite_steps=9"])
    ref, run = (
        _weights(tmp_path / "ref/checkpoints/last.pt"),
        _weights(tmp_path / "run/checkpoints/last.pt"),
    )
    assert all(torch.equal(ref[k], run[k]) for k in ref)


def test_more_bad_steps_than_allowed_stop(train, poison, tmp_path):
    poison({2, 5})
    with pytest.raises(
        TrainingDiverged, match=r"outer step 5 .*2 such steps, more than max_nonfinite_steps=1"
    ):
        train(tmp_path, ["max_nonfinite_steps=1"])
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 3


def test_interrupted_run_never_saves_nonfinite_weights(train, monkeypatch, tmp_path):
    """Weights that turn non-finite with a finite meta-gradient (an overflowing update): the
    SIGTERM path's final save refuses, and last.pt stays the one of step 3."""
    original = Trainer.train_step

    def overflow(self, **kwargs):
        metrics = original(self, **kwargs)
        if self.step == 5:
            with torch.no_grad():
                next(self.algorithm.model.parameters()).fill_(math.inf)
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", overflow)
    with pytest.raises(TrainingDiverged, match="after outer step 5 the state to checkpoint holds"):
        train(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 3


def test_finite_meta_loss_beyond_the_bound_stops_and_keeps_the_last_good_checkpoint(
    train, explode, tmp_path
):
    train(tmp_path / "ref", ["outer_steps=6"])
    explode({8})
    with pytest.raises(TrainingDiverged) as info:
        train(tmp_path / "run")
    message = str(info.value)
    assert "training diverged: train/meta_loss=" in message
    assert "at outer step 8 is more than divergence_factor=100 times the loss before" in message
    assert "divergence_factor=null turns this bound off" in message
    assert "algo.inner_lr (now 0.01)" in message and "grad_clip=10" in message
    last = tmp_path / "run/checkpoints/last.pt"
    assert f"the last good one is {last} (step 6)" in message
    _assert_finite_and_equal(last, tmp_path / "ref/checkpoints/last.pt", step=6)
    assert not (tmp_path / "run/results.json").exists()


def test_the_bound_is_a_key(train, explode, make_config, tiny, tmp_path):
    explode({8})
    summary = train(tmp_path / "off", ["divergence_factor=null"])
    assert summary.step == 12
    assert load_checkpoint(tmp_path / "off/checkpoints/last.pt")["loss_reference"] is None
    # 1e9 times a loss close to the one before training: within a bound of 1e11 times it.
    assert train(tmp_path / "loose", ["divergence_factor=1e11"]).step == 12
    with pytest.raises(ConfigError, match="divergence_factor must be > 1 or null"):
        make_config([*tiny, "divergence_factor=0.5"])


def test_the_reference_is_measured_once_and_kept_in_checkpoints(train, monkeypatch, tmp_path):
    """A resumed run keeps the bound of the run it continues (measured on the initial weights),
    and measuring it leaves the run's numbers alone: the same weights as without the bound."""
    train(tmp_path / "plain", ["divergence_factor=null"])
    train(tmp_path / "run", ["outer_steps=6"])
    reference = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["loss_reference"]
    assert reference > 0 and math.isfinite(reference)

    def measure_again(self):
        raise AssertionError("a resumed run measured the reference again")

    monkeypatch.setattr(Trainer, "measure_loss_reference", measure_again)
    train(tmp_path / "run", ["resume=true"])
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["step"] == 12 and state["loss_reference"] == reference
    _assert_finite_and_equal(
        tmp_path / "run/checkpoints/last.pt", tmp_path / "plain/checkpoints/last.pt", step=12
    )


def test_a_step_that_does_not_log_reads_one_value_with_the_bound_on(
    make_config, tiny, tmp_path, monkeypatch
):
    """The bound reads the meta-loss in the check's one transfer: no second host read."""
    trainer = make_trainer(make_config([*tiny, *ARGS]), tmp_path)
    evaluated: list[int] = []
    evaluate = trainer.algorithm.evaluate

    def counting_evaluate(batch, inner_steps=None):
        evaluated.append(len(batch))
        return evaluate(batch, inner_steps)

    monkeypatch.setattr(trainer.algorithm, "evaluate", counting_evaluate)
    trainer.loss_reference = trainer.measure_loss_reference()
    monkeypatch.undo()
    # 16 tasks a meta-batch (of 2) at a time: one meta-batch is too noisy a reference.
    assert evaluated == [2] * 8
    assert trainer.loss_bound() == pytest.approx(100 * trainer.loss_reference)
    trainer.train_step(logged=False)
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(Path(metarun.__file__).parent)):  # metarun's own reads
                reads.append(f"{__name} in {caller}:{sys._getframe(1).f_lineno}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer.train_step(logged=False)
    monkeypatch.undo()
    assert len(reads) == 1 and reads[0].startswith("tolist in") and "trainer.py" in reads[0], reads


def test_nonfinite_entries_names_the_tensors():
    state = {"a": {"w": torch.ones(2), "b": torch.tensor([1.0, math.nan])}, "n": torch.tensor([3])}
    assert nonfinite_entries(state) == ["a.b"]
    assert nonfinite_entries({"l": [torch.tensor(math.inf)]}) == ["l.0"]
    assert nonfinite_entries({}) == []


# ----------------------------------------------------------------------------- real processes


TINY_CLI = [
    "meta_batch_size=2",
    "eval.every=0",
    "eval.num_tasks=6",
    "eval.batch_size=3",
    "log.every=10",
    "log.progress=false",
    "device=cpu",
]


def test_cli_exits_1_with_the_message(tmp_path):
    """The issue's command: algo.inner_lr=1e6 makes the very first meta-loss infinite."""
    run_dir = tmp_path / "run"
    result = run_metarun(
        [
            "algo.inner_lr=1e6",
            "outer_steps=100",
            "save.every=20",
            *TINY_CLI,
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: training diverged: non-finite meta-loss or meta-gradient at outer step 1" in (
        result.stderr
    )
    assert "algo.inner_lr (now 1e+06)" in result.stderr and "grad_clip" in result.stderr
    assert "test loss" not in result.stdout
    assert not (run_dir / "checkpoints" / "last.pt").exists()


OMNIGLOT = Path(os.environ.get("METARUN_DATA", "/work/shared/data")) / "omniglot"


@pytest.mark.skipif(
    not list(OMNIGLOT.glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_cli_stops_a_divergence_that_stays_finite(tmp_path):
    """The issue's command on real Omniglot (split=random): inner_lr=1e6 gives a finite
    meta-loss of about 1e10 from the first step (before the bound: exit 0, chance accuracy and a
    test loss of 1e27). Now it stops at step 1 with exit 1 and writes no checkpoint."""
    run_dir = tmp_path / "run"
    result = run_metarun(
        [
            "dataset=omniglot",
            "dataset.split=random",
            "algo.inner_lr=1e6",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "model.hidden=8",
            "algo.task_batching=loop",
            "outer_steps=20",
            "save.every=1",
            *TINY_CLI,
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        env=cli_env(METARUN_DATA=str(OMNIGLOT.parent)),
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: training diverged: train/meta_loss=" in result.stderr
    assert "at outer step 1 is more than divergence_factor=100 times the loss before" in (
        result.stderr
    )
    assert "algo.inner_lr (now 1e+06)" in result.stderr
    assert "test loss" not in result.stdout and "test accuracy" not in result.stdout
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "checkpoints" / "last.pt").exists()


def test_sweep_marks_the_diverged_job_failed(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_metarun(
        [
            "-m",
            "algo.inner_lr=1e6,0.01",
            "outer_steps=4",
            *TINY_CLI,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert result.returncode == 1, result.stderr
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[0]["note"].startswith("TrainingDiverged: training diverged: non-finite")


@pytest.mark.slow
def test_all_ranks_stop_together(tmp_path):
    """Two gloo processes: both stop at the same step (none hangs in an all-reduce)."""
    run_dir = tmp_path / "run"
    result = run_metarun(
        [
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "metarun.cli",
            "algo.inner_lr=1e6",
            "outer_steps=20",
            *[a for a in TINY_CLI if not a.startswith("meta_batch_size")],
            "meta_batch_size=4",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        command=[str(BIN / "torchrun")],
        env=cli_env(METARUN_CACHE=str(tmp_path)),
        timeout=240,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error: training diverged") == 2, output[-3000:]
    assert "at outer step 1 " in output
