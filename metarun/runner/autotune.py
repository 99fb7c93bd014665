"""``task_batching=auto``: pick loop or vmap (and the vmap chunk size) from a short measurement.

Candidates: the task loop, full vmap and vmap in halving chunks. Each is timed on a real
meta-batch (median of ``repeats`` after a warm-up). Memory: peak allocated bytes on CUDA; on
CPU a model from one task's autograd graph (see :func:`task_graph_bytes`). The fastest candidate
within the memory budget wins. Gradients produced while measuring are discarded.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from metarun.tasks import TaskBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    mode: str  # "loop" | "vmap"
    chunk: int | None  # tasks per vmapped chunk (None: whole meta-batch)
    seconds: float
    bytes: int

    def describe(self) -> str:
        what = self.mode if self.mode == "loop" else f"vmap(chunk={self.chunk})"
        return f"{what}: {self.seconds * 1e3:.1f} ms/step, {self.bytes / 2**20:.1f} MiB"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cpu_peak_bytes(fn: Any) -> int | None:
    """Peak resident memory ``fn`` adds, in bytes (Linux: resets the high-water mark through
    ``/proc/self/clear_refs``); ``None`` where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def _measure(algo: Any, batch: TaskBatch, device: torch.device, repeats: int) -> tuple[float, int]:
    def step() -> None:
        algo.meta_train_step(batch)

    cuda = device.type == "cuda"
    step()  # warm-up (allocator, kernels, vmap tracing caches)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    mem = int(torch.cuda.max_memory_allocated(device)) if cuda else 0
    return statistics.median(times), mem


def task_graph_bytes(algo: Any, batch: TaskBatch) -> int:
    """Bytes autograd saves for one task's meta-gradient (task loop, first task of ``batch``).

    The CPU allocator exposes no peak and caches freed blocks, so on CPU memory is modelled:
    the loop holds one task's graph at a time, a vmapped chunk of ``c`` tasks about ``c`` times
    that. (``torch.func`` transforms refuse saved-tensor hooks, hence measuring the loop.)
    """
    from metarun.algorithms.maml import TaskBatching

    mode = algo.task_batching
    algo.task_batching = TaskBatching.LOOP
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            algo.meta_train_step(batch.task(0))
    finally:
        algo.task_batching = mode
    return total


def candidates(n: int) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = [("loop", None), ("vmap", None)]
    size = n // 2
    while size >= 2:
        out.append(("vmap", size))
        size //= 2
    return out


def choose_task_batching(
    algo: Any,
    batch: TaskBatch,
    device: torch.device,
    *,
    memory_budget_mb: float | None = None,
    repeats: int = 3,
) -> Choice:
    """Measures the candidates on ``batch``, sets the winner on ``algo`` and returns it.

    Args:
        algo: an algorithm with ``task_batching``/``task_chunk_size`` attributes (MAML).
        batch: a real meta-batch (on ``device``).
        device: where it runs.
        memory_budget_mb: candidates using more are skipped (``None``: no limit). If none fits,
            the loop (least memory) is used.
        repeats: timed steps per candidate.

    Raises:
        ValueError: if the algorithm cannot batch tasks.
    """
    if not hasattr(algo, "task_batching"):
        raise ValueError(
            f"task_batching=auto needs an algorithm that can batch tasks; "
            f"{type(algo).__name__} cannot (set task_batching=loop)"
        )
    from metarun.algorithms.maml import BNPolicy, TaskBatching

    if getattr(algo, "bn_policy", None) is BNPolicy.RUNNING_STATS:
        log.info("task_batching=auto: running-statistics BatchNorm needs the loop")
        algo.task_batching, algo.task_chunk_size = TaskBatching.LOOP, None
        return Choice("loop", None, float("nan"), 0)
    log_pre = algo.pre_adaptation_metrics
    algo.pre_adaptation_metrics = False
    results: list[Choice] = []
    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    try:
        per_task = 0 if device.type == "cuda" else task_graph_bytes(algo, batch)
        for mode, chunk in candidates(len(batch)):
            algo.task_batching, algo.task_chunk_size = TaskBatching(mode), chunk
            seconds, mem = _measure(algo, batch, device, repeats)
            if device.type != "cuda":
                mem = per_task * (1 if mode == "loop" else (chunk or len(batch)))
            results.append(Choice(mode, chunk, seconds, mem))
            log.info("task_batching=auto measured %s", results[-1].describe())
    finally:
        for p in algo.parameters():
            p.grad = None
        algo.pre_adaptation_metrics = log_pre
    fitting = [c for c in results if budget is None or c.bytes <= budget]
    best = min(fitting, key=lambda c: c.seconds) if fitting else results[0]
    if not fitting:
        log.warning(
            "task_batching=auto: nothing fits memory_budget_mb=%s; using the loop", memory_budget_mb
        )
    algo.task_batching, algo.task_chunk_size = TaskBatching(best.mode), best.chunk
    log.info("task_batching=auto chose %s", best.describe())
    return best
