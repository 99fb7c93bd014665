"""Two processes (gloo, CPU) give the same meta-losses and parameters as one process with the
same seed and meta-batch: the meta-batch is split across ranks and gradients all-reduced."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import BIN, MNIST_IMBALANCE, cli_env, free_port, read_metrics, run_captured


def _launch(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return run_captured(cmd, tmp, env=cli_env(METARUN_CACHE=str(tmp)), timeout=300)


def _run(cmd: list[str], tmp: Path) -> None:
    res = _launch(cmd, tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _torchrun_cmd(args: list[str], run_dir: Path, procs: int = 2) -> list[str]:
    return [
        str(BIN / "torchrun"),
        f"--nproc_per_node={procs}",
        f"--master_port={free_port()}",
        "-m",
        "metarun.cli",
        *args,
        f"hydra.run.dir={run_dir}",
    ]


def _one_and_two(common: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The run dirs of ``metarun *common`` in one process and under torchrun in two."""
    single, double = tmp_path / "one", tmp_path / "two"
    _run([str(BIN / "metarun"), *common, f"hydra.run.dir={single}"], tmp_path)
    _run(_torchrun_cmd(common, double), tmp_path)
    return single, double


def _assert_same_weights(single: Path, double: Path) -> None:
    ca = torch.load(single / "checkpoints" / "last.pt", weights_only=False)["algorithm"]
    cb = torch.load(double / "checkpoints" / "last.pt", weights_only=False)["algorithm"]
    assert ca.keys() == cb.keys()
    for key in ca:
        torch.testing.assert_close(cb[key], ca[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_two_processes_match_one(tmp_path: Path, algo: str) -> None:
    common = [
        f"algo={algo}",
        "outer_steps=6",
        "meta_batch_size=4",
        "log.every=1",
        "eval.every=0",
        "eval.num_tasks=4",
        "save.every=0",
        "prefetch=0",
        "algo.task_batching=loop",
        "device=cpu",
    ]
    single, double = _one_and_two(common, tmp_path)
    a, b = (
        [r["train/meta_loss"] for r in read_metrics(d) if "train/meta_loss" in r]
        for d in (single, double)
    )
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    _assert_same_weights(single, double)
    # Rank 1 wrote nothing of its own into the shared run dir.
    assert not (double / "metrics.jsonl.1").exists()
    assert len([p for p in double.iterdir() if p.name.startswith("tb")]) == 1


def _mnist(tmp: Path, algo: str, batch_size: int) -> list[str]:
    """Overrides for a tiny run on generated MNIST test files (written under ``tmp``)."""
    from metarun.testing import write_mnist

    data = tmp / "data"
    write_mnist(data / "mnist" / "raw", "t10k", {4: 40, 9: 60, 1: 5}, marker=1, gz=True)
    dataset = [o for o in MNIST_IMBALANCE if not o.startswith("dataset.batch_size=")]
    root = f"dataset.root={data}"
    return [f"algo={algo}", *dataset, root, f"dataset.batch_size={batch_size}", "device=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["l2rw", "erm"])
def test_reweighting_two_processes_match_one(tmp_path: Path, algo: str) -> None:
    """L2RW/ERM split each step's examples (training and clean batch) across processes: the
    same losses, example weights' masses and parameters as one process (LeNet, no BatchNorm)."""
    common = [
        *_mnist(tmp_path, algo, batch_size=8),
        "outer_steps=5",
        "log.every=1",
        "eval.every=0",
        "save.every=0",
        "prefetch=0",
    ]
    single, double = _one_and_two(common, tmp_path)
    rows = [read_metrics(d) for d in (single, double)]
    keys = ["train/loss", "train/weighted_loss", "weights/minority_mass"]
    if algo == "l2rw":
        keys.append("weights/eps_grad_norm")
    for key in keys:
        a, b = ([r[key] for r in rs if key in r] for rs in rows)
        assert len(a) == 5 and a == pytest.approx(b, rel=1e-5, abs=1e-6), key
    _assert_same_weights(single, double)


def test_reweighting_batches_must_split_evenly(tmp_path: Path) -> None:
    args = [*_mnist(tmp_path, "l2rw", batch_size=7), "outer_steps=1"]
    res = _launch(_torchrun_cmd(args, tmp_path / "run"), tmp_path)
    assert res.returncode != 0
    message = "dataset.batch_size must be divisible by the number of processes (2), got 7"
    assert message in res.stdout + res.stderr
