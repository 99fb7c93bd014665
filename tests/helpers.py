"""Helpers several test files share (fixtures live in ``conftest.py``; fake data files in
:mod:`metarun.testing`). pytest puts ``tests/`` on ``sys.path``, so a test imports them as
``from helpers import ...``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

METARUN = str(Path(sys.executable).with_name("metarun"))
BIN = Path(sys.executable).parent

# The MNIST imbalance dataset on a 50-image pool of the files ``conftest.mnist_files`` writes.
MNIST_IMBALANCE = [
    "dataset=mnist_imbalance",
    "dataset.source_split=test",
    "dataset.pos_ratio=0.9",
    "dataset.n_train=50",
    "dataset.n_val=4",
    "dataset.n_test=10",
    "dataset.batch_size=8",
]

# A few seconds: 4 steps of L2RW or MWN on it.
MNIST_TINY = [
    *MNIST_IMBALANCE,
    "outer_steps=4",
    "log.every=2",
    "eval.every=2",
    "save.every=2",
    "log.progress=false",
    "device=cpu",
]

# The acceptance runs of L2RW and MWN on the real MNIST test file: 758 training images at
# pos_ratio 0.995 (4 fours), SGD at lr 0.03 with the gradient clipped to norm 1, tested on 500.
MNIST_0995 = [
    *MNIST_IMBALANCE[:2],
    "dataset.pos_ratio=0.995",  # 4 fours among 758 training images
    "dataset.n_train=758",  # the largest that fits with n_test=500
    "dataset.n_test=500",
    "meta_optimizer.lr=0.03",
    "grad_clip=1",
    "eval.every=0",
    "save.every=0",
    "log.tensorboard=false",
    "log.progress=false",
    "device=cpu",
]


# ------------------------------------------------------------------------------ real processes


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``metarun`` subprocess: Hydra's short error reports, and one thread
    per process (the runs are tiny, and equal thread counts keep float results comparable
    between processes)."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_captured(
    command: Sequence[str | Path],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """``command`` in ``cwd`` (environment :func:`cli_env` unless given), output captured as
    text."""
    return subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_metarun(
    args: Sequence[str | Path],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    command: Sequence[str | Path] = (METARUN,),
) -> subprocess.CompletedProcess[str]:
    """``metarun *args`` (or ``command *args``) in ``cwd``, as :func:`run_captured`."""
    return run_captured([*command, *args], cwd, env=env, timeout=timeout)


def free_port() -> int:
    """A TCP port free on this machine now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, one dict a logged step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the trainer


@contextlib.contextmanager
def sigterm_after(step: int) -> Iterator[None]:
    """Within the block, the trainer sends its own process SIGTERM right after outer step
    ``step``, as a cluster scheduler would preempt a job."""
    from metarun.runner.trainer import Trainer

    original = Trainer.train_step

    def preempted(self: Trainer, **kwargs: Any) -> Any:
        metrics = original(self, **kwargs)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", preempted)
        yield


def run_and_resume(run: Callable[..., Any], root: Path) -> tuple[dict, dict]:
    """The last checkpoints of ``root/once`` (a run already made) and of ``root/twice``: the
    same run stopped after 2 steps and resumed to its end."""
    from metarun.runner.checkpoint import load_checkpoint

    run(root / "twice", ["outer_steps=2"])
    run(root / "twice", ["resume=true"])
    return tuple(load_checkpoint(root / d / "checkpoints" / "last.pt") for d in ("once", "twice"))


def make_trainer(config: Any, run_dir: Path) -> Any:
    """The :class:`~metarun.runner.trainer.Trainer` the runner builds for ``config`` (its
    experiment and meta-optimizer attached; no TensorBoard), for calling its steps directly."""
    from metarun.runner.build import build_experiment, build_meta_optimizer
    from metarun.runner.logging import RunLogger
    from metarun.runner.trainer import Trainer

    experiment = build_experiment(config)
    optimizer = build_meta_optimizer(config.meta_optimizer, experiment.algorithm.meta_parameters())
    experiment.algorithm.attach_optimizer(optimizer)
    logger = RunLogger(run_dir, tensorboard=False)
    return Trainer(experiment, optimizer, logger, run_dir, config_yaml="", options={})


# --------------------------------------------------------------------- finite differences

# How many float64 roundings the value of a small network's loss carries, at most, relative to
# its size: a generous count, so that the bound is never the reason a correct gradient fails.
_ROUNDINGS = 10


def fd_roundoff(scale: float, h: float) -> float:
    """The rounding error of a float64 central difference with step ``h`` of a function of size
    ``scale`` (see :class:`CentralDifference`)."""
    return _ROUNDINGS * torch.finfo(torch.float64).eps * abs(scale) / h


@dataclass(frozen=True)
class CentralDifference:
    """``(f(x + h d) - f(x - h d)) / 2h`` with what its rounding allows.

    Each of the two values carries up to ``_ROUNDINGS * eps * |f|`` of rounding, so the
    quotient carries ``_ROUNDINGS * eps * |f| / h``: an absolute tolerance below that fails by
    chance (issue 19: 1.1e-10 against ``abs=1e-10`` on a loaded machine), whatever the gradient.
    """

    up: float
    down: float
    h: float

    @property
    def value(self) -> float:
        return (self.up - self.down) / (2 * self.h)

    @property
    def roundoff(self) -> float:
        return fd_roundoff(max(abs(self.up), abs(self.down)), self.h)

    def approx(self, rel: float) -> Any:
        """``pytest.approx`` of the difference: ``rel`` for the truncation error, the roundoff
        as the absolute part."""
        return pytest.approx(self.value, rel=rel, abs=self.roundoff)


def central_difference(
    f: Callable[[], torch.Tensor | float],
    tensors: Sequence[torch.Tensor],
    dirs: Sequence[torch.Tensor],
    h: float = 1e-6,
) -> CentralDifference:
    """The central difference of ``f()`` along ``dirs``, moving ``tensors`` in place (restored
    after)."""

    def shift(scale: float) -> None:
        with torch.no_grad():
            for t, d in zip(tensors, dirs):
                t.add_(scale * h * d)

    shift(1.0)
    up = float(f())
    shift(-2.0)
    down = float(f())
    shift(1.0)
    return CentralDifference(up, down, h)


# ------------------------------------------------------------------ L2RW and MWN step oracles


class SmallNet(nn.Module):
    """A two-layer tanh classifier (4 -> 6 -> 3), with BatchNorm if asked."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6) if bn else nn.Identity()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def small_batch(
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 training and 6 clean examples for :class:`SmallNet`: ``(x, y, clean_x, clean_y)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, dtype=dtype, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    vx = torch.randn(6, 4, dtype=dtype, generator=g)
    vy = torch.randint(0, 3, (6,), generator=g)
    return x, y, vx, vy


class ThreadAllReduce:
    """A stand-in for torch.distributed among threads: every thread sums the same tensors in
    the same order, so all get identical results."""

    def __init__(self, n: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], None]:
        def all_reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(s for s in self.slots if s is not None)
            self.barrier.wait()
            t.copy_(total)

        return all_reduce


def run_in_threads(work: Callable[[int], None], n: int = 2) -> None:
    """``work(rank)`` for each rank in its own thread, joined."""
    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------ short runs and their logs

#: A preset's smoke run: two outer steps, a tiny model, validation and test on two tasks.
SMOKE_RUN = [
    "outer_steps=2",
    "log.every=1",
    "eval.every=2",
    "eval.val_tasks=2",
    "eval.num_tasks=2",
    "model.hidden=2",
]


def omniglot_random(tmp_path: Path) -> list[str]:
    """Real Omniglot over the characters present (the minimal splits), cached in ``tmp_path``
    rather than next to the shared archives."""
    return ["dataset=omniglot", "dataset.split=random", f"dataset.cache_dir={tmp_path / 'cache'}"]


#: A short real-data run (Omniglot 5-way 1-shot, minutes on 2 cores): 40 outer steps of 4 tasks,
#: validated at 20 and 40 on 20 tasks, tested on 100.
OMNIGLOT_40_STEPS = [
    "outer_steps=40",
    "meta_batch_size=4",
    "eval.every=20",
    "eval.val_tasks=20",
    "eval.num_tasks=100",
    "log.every=10",
]


def tensorboard(run_dir: Path) -> Any:
    """A run's TensorBoard events, loaded (``.Tags()``, ``.Scalars(tag)``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


def scalar_tags(run_dir: Path) -> set[str]:
    return set(tensorboard(run_dir).Tags()["scalars"])


def assert_meta_learned(run_dir: Path, tags: set[str]) -> set[str]:
    """The run logged ``tags`` (and returns all it logged), and every logged meta-gradient norm
    is finite and positive: the outer loop reached the weights."""
    acc = tensorboard(run_dir)
    logged = set(acc.Tags()["scalars"])
    assert tags | {"hypergrad/norm"} <= logged, sorted(logged)
    norms = [e.value for e in acc.Scalars("hypergrad/norm")]
    assert norms and all(math.isfinite(v) and v > 0 for v in norms), norms
    return logged


def grads_and_directions(
    params: Sequence[torch.Tensor], seed: int = 5
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters' gradients (copied) and a random direction for each, for a directional
    finite-difference check."""
    gen = torch.Generator().manual_seed(seed)
    grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    return grads, [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
