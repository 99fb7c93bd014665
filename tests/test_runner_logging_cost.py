"""Logging costs no numbers: what a run computes does not depend on how often it logs (only
logged steps compute pre-adaptation metrics and hypergradient norms, and metrics are read from
the device once per step)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import MNIST_IMBALANCE, make_trainer, read_metrics

import metarun
from metarun.runner.checkpoint import load_checkpoint

# A fixed task batching: auto's measurement would be the only difference between the runs.
COMMON = ["outer_steps=6", "eval.every=0", "save.every=0", "algo.task_batching=vmap"]


@pytest.fixture
def train(train_with):
    return train_with(COMMON)


def _records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "hypergrad/norm" in r}


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_logging_every_step_or_every_third_computes_the_same(train, tmp_path, batching):
    every_step = train(tmp_path / "every1", ["log.every=1", f"algo.task_batching={batching}"])
    every_third = train(tmp_path / "every3", ["log.every=3", f"algo.task_batching={batching}"])

    # The same weights after training, and the same test loss, to the last bit.
    ours = load_checkpoint(tmp_path / "every1" / "checkpoints" / "last.pt")["algorithm"]
    theirs = load_checkpoint(tmp_path / "every3" / "checkpoints" / "last.pt")["algorithm"]
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    loss = every_step.results["test"]["metrics"]["loss"]["mean"]
    assert loss == every_third.results["test"]["metrics"]["loss"]["mean"]

    # A step logged by both runs logs the same meta-gradient norm and the same last-step value.
    one, three = _records(tmp_path / "every1"), _records(tmp_path / "every3")
    assert set(three) == {3, 6}
    for step in (3, 6):
        norm = three[step]["hypergrad/norm"]
        assert one[step]["hypergrad/norm"] == pytest.approx(norm, rel=1e-12)
        assert one[step]["train/pre_loss"] == pytest.approx(three[step]["train/pre_loss"], rel=1e-6)
    # Interval means: the every-third run's value at step 3 is the mean of steps 1..3.
    mean = sum(one[s]["train/meta_loss"] for s in (1, 2, 3)) / 3
    assert three[3]["train/meta_loss"] == pytest.approx(mean, rel=1e-6)


def test_prefetching_by_default_only_on_cuda():
    """A producer thread pays on a GPU (it overlaps the device); on a CPU it takes cores from
    the step (scripts/bench_runner.py: 1.35x the default job's step on 2 cores)."""
    from metarun.runner.trainer import prefetch_depth

    assert prefetch_depth(None, torch.device("cuda")) == 2
    assert prefetch_depth(None, torch.device("cpu")) == 0
    assert prefetch_depth(3, torch.device("cpu")) == 3  # an explicit value is kept


# ------------------------------------------------------------------- host reads on unlogged steps

_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy")
_PACKAGE = str(Path(metarun.__file__).parent)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo.task_batching=vmap"],
        ["algo.task_batching=loop"],
        ["algo=reptile", "meta_batch_size=2"],
        [
            "algo=l2rw",
            "meta_batch_size=1",
            *MNIST_IMBALANCE,
        ],
    ],
    ids=["maml-vmap", "maml-loop", "reptile", "l2rw"],
)
def test_a_step_that_does_not_log_reads_one_value_from_the_device(
    make_config, tiny, tmp_path, monkeypatch, overrides
):
    """On a GPU every host read waits for the device: metarun's own code reads exactly one
    value on a step that does not log (the divergence check's fused flag)."""
    trainer = make_trainer(make_config([*tiny, *overrides]), tmp_path)
    trainer.train_step(logged=False)  # first-step work (optimizer state, lazy set-up)
    reads: list[str] = []
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, __original=original, __name=name, **kwargs):  # type: ignore[no-untyped-def]
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(_PACKAGE):
                reads.append(f"{__name} in {caller}:{sys._getframe(1).f_lineno}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    metrics = trainer.train_step(logged=False)
    monkeypatch.undo()
    assert len(reads) == 1 and "trainer.py" in reads[0], reads
    assert metrics and all(isinstance(v, (float, torch.Tensor)) for v in metrics.values())
