"""MAML's ``task_batching=auto``: pick loop or vmap (and the vmap chunk) from a short measurement.

Candidates: the task loop, full vmap and vmap in halving chunks.

Memory first: one task's autograd graph is measured once (:func:`task_graph_bytes`), and a
candidate whose model (the loop holds one task's graph, a vmapped chunk of ``c`` tasks ``c`` of
them) exceeds the budget is never run. Real peaks of the first timed step are checked as well
(CUDA: peak allocated bytes; Linux CPU: growth of the resident high-water mark, which
undercounts when the allocator reuses cached blocks, so it only raises the model's figure). An
out-of-memory error drops only that candidate.

Speed: after one warm-up step each, the candidates are timed in interleaved rounds on the same
real meta-batch, so slow drifts of a shared machine (other jobs, clock changes) hit all of them
alike. Each candidate's time is the median of its rounds: the minimum would favour a candidate
whose steps vary a lot (on a busy machine the many small kernels of the loop do), while
training throughput follows the typical step.

A busy machine only ever adds time, and one step can take 70x its quiet time (issue 24: 14.2 s
for a 0.21 s step), so no single step decides anything: a candidate is dropped only after two of
its own steps, when even the faster of them is more than ``DROP`` times the best median; the
halving of vmap chunks stops only when two steps of a chunk say so. After ``repeats`` rounds
only the candidates within 5% of the best go on, for at most ``max_extra_rounds`` more. The
whole choice stops at ``max_seconds`` (``None``: no cap), keeping the fastest median so far.

Gradients produced while measuring are discarded.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metarun.spec.enums import BNPolicy, TaskBatching
from metarun.tasks import TaskBatch

log = logging.getLogger(__name__)

# A candidate with two or more timed steps whose fastest is slower than the best median by this
# factor stops being timed (its fastest step is what a quiet machine gives, or more).
DROP = 1.25
# Candidates within this fraction of the best after ``repeats`` rounds get extra rounds.
CLOSE = 0.05
# Halving the vmap chunk stops once a chunk's fastest of two steps is this much slower than the
# previous chunk's fastest: step time against chunk size has one minimum (per-task overhead on
# one side, poor cache use on the other).
CHUNK_STOP = 1.5
# The whole measurement's cap, seconds: the README's 5-50 s on an idle machine; a busy one
# keeps the fastest median measured by then.
MAX_SECONDS = 60.0


@dataclass(frozen=True)
class Choice:
    mode: str  # "loop" | "vmap"
    chunk: int | None  # tasks per vmapped chunk (None: whole meta-batch)
    seconds: float  # median timed step
    bytes: int  # peak of one step: the larger of model and measurement
    rounds: int = 0  # timed steps behind ``seconds``

    def describe(self) -> str:
        return (
            f"{_label(self.mode, self.chunk)}: {self.seconds * 1e3:.1f} ms/step "
            f"(median of {self.rounds}), {self.bytes / 2**20:.1f} MiB"
        )

    def overrides(self) -> str:
        """The config overrides that make this choice without measuring (for repeating a run
        bit for bit: loop and vmap agree only to float rounding)."""
        chunk = "null" if self.mode == "loop" or self.chunk is None else str(self.chunk)
        return f"algo.task_batching={self.mode} algo.task_chunk_size={chunk}"


def _label(mode: str, chunk: int | None) -> str:
    return mode if mode == "loop" else f"vmap(chunk={chunk or 'all'})"


@dataclass
class _Candidate:
    mode: str
    chunk: int | None
    bytes: int
    times: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times) if self.times else float("inf")

    def choice(self) -> Choice:
        return Choice(self.mode, self.chunk, self.seconds, self.bytes, len(self.times))


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def cpu_peak_bytes(fn: Any) -> int | None:
    """Runs ``fn`` and returns the peak resident memory it added, in bytes (Linux: resets the
    high-water mark through ``/proc/self/clear_refs``); ``None`` where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def task_graph_bytes(algo: Any, batch: TaskBatch) -> int:
    """Bytes autograd saves for one task's meta-gradient (task loop, first task of ``batch``).

    The CPU allocator exposes no peak and caches freed blocks, so memory is modelled from this:
    the loop holds one task's graph at a time, a vmapped chunk of ``c`` tasks about ``c`` times
    that. (``torch.func`` transforms refuse saved-tensor hooks, hence measuring the loop.)
    """
    mode = algo.task_batching
    algo.task_batching = TaskBatching.loop
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
    """Loop, full vmap, then vmap in chunks of n/2, n/4, ... down to 2 tasks."""
    out: list[tuple[str, int | None]] = [("loop", None), ("vmap", None)]
    size = n // 2
    while size >= 2:
        out.append(("vmap", size))
        size //= 2
    return out


class _Timer:
    def __init__(
        self, algo: Any, batch: TaskBatch, device: torch.device, clock: Callable[[], float]
    ) -> None:
        self.algo, self.batch, self.device, self.clock = algo, batch, device, clock
        self.cuda = device.type == "cuda"

    def select(self, c: _Candidate) -> None:
        self.algo.task_batching, self.algo.task_chunk_size = TaskBatching(c.mode), c.chunk

    def step(self, c: _Candidate) -> float:
        self.select(c)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = self.clock()
        self.algo.meta_train_step(self.batch)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.clock() - t0

    def warm_up(self, c: _Candidate) -> float | None:
        """One step not counted in the rounds (allocator, kernels, vmap caches); returns its
        seconds, or None if a vmap candidate ran out of memory."""
        try:
            return self.step(c)
        except torch.OutOfMemoryError:
            if c.mode == "loop":
                raise  # nothing needs less memory; the run cannot go on
            for p in self.algo.parameters():
                p.grad = None
            if self.cuda:
                torch.cuda.empty_cache()
            return None

    def timed_step_with_memory(self, c: _Candidate) -> None:
        """A timed step that also measures its peak. Not the warm-up step: its first-call costs
        (lazy imports, vmap set-up) would count."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            c.times.append(self.step(c))
            c.bytes = max(c.bytes, int(torch.cuda.max_memory_allocated(self.device)))
            return
        measured = cpu_peak_bytes(lambda: c.times.append(self.step(c)))
        if measured is not None:
            c.bytes = max(c.bytes, measured)


def choose_task_batching(
    algo: Any,
    batch: TaskBatch,
    device: torch.device,
    *,
    memory_budget_mb: float | None = None,
    repeats: int = 3,
    max_extra_rounds: int | None = None,
    max_seconds: float | None = MAX_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
) -> Choice:
    """Measures the candidates on ``batch``, sets the winner on ``algo`` and returns it.

    Args:
        algo: an algorithm with ``task_batching``/``task_chunk_size`` attributes (MAML).
        batch: a real meta-batch (on ``device``).
        device: where it runs.
        memory_budget_mb: candidates using more are never run (``None``: no limit). If none
            fits, the loop (least memory) is used.
        repeats: interleaved timed rounds before only the close candidates go on (>= 2 for a
            median that one slow step cannot move).
        max_extra_rounds: further rounds, only for candidates within 5% of the best
            (default: ``repeats``).
        max_seconds: cap on the whole measurement, warm-up steps included, on ``clock``
            (``None``: none). When it runs out, the fastest median so far is kept (the loop's
            warm-up and one timed step always run).
        clock: seconds for timing steps and the cap; tests pass a simulated one so that the
            choice does not depend on how busy the machine is.

    Raises:
        ValueError: if the algorithm cannot batch tasks.
    """
    if not hasattr(algo, "task_batching"):
        raise ValueError(
            f"task_batching=auto needs an algorithm that can batch tasks; "
            f"{type(algo).__name__} cannot (set task_batching=loop)"
        )
    only_loop = None
    if getattr(algo, "bn_policy", None) is BNPolicy.running_stats:
        only_loop = "running-statistics BatchNorm"
    elif getattr(algo, "checkpoint_inner", False):
        only_loop = "checkpoint_inner=true (torch.func cannot checkpoint)"
    if only_loop is not None:
        log.info("task_batching=auto: %s needs the loop", only_loop)
        algo.task_batching, algo.task_chunk_size = TaskBatching.loop, None
        return Choice("loop", None, float("nan"), 0)
    extra = repeats if max_extra_rounds is None else max_extra_rounds
    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    log_pre = algo.pre_adaptation_metrics
    algo.pre_adaptation_metrics = False
    start = time.perf_counter()
    began = clock()
    timer = _Timer(algo, batch, device, clock)

    def out_of_time() -> bool:
        return max_seconds is not None and clock() - began >= max_seconds

    timed_out = False
    try:
        # The modelled memory matters only under a budget; it costs one step of the loop.
        per_task = 0 if budget is None else task_graph_bytes(algo, batch)

        def fits(c: _Candidate, how: str) -> bool:
            if budget is None or c.mode == "loop" or c.bytes <= budget:
                return True  # the loop is the fallback whatever it needs
            log.info(
                "task_batching=auto skips vmap(chunk=%s): %s%.0f MiB > memory_budget_mb=%s",
                c.chunk or "all",
                how,
                c.bytes / 2**20,
                memory_budget_mb,
            )
            return False

        pool: list[_Candidate] = []
        previous: _Candidate | None = None  # the last vmap chunk measured
        for mode, chunk in candidates(len(batch)):
            if pool and out_of_time():
                timed_out = True
                break
            c = _Candidate(mode, chunk, per_task * (1 if mode == "loop" else chunk or len(batch)))
            if not fits(c, "modelled "):
                continue
            if timer.warm_up(c) is None:
                log.info("task_batching=auto: vmap(chunk=%s) ran out of memory", chunk or "all")
                continue
            # Round one for this candidate right after its warm-up: on CUDA a warm-up step
            # can take 50x a timed one (kernel selection for new shapes), so only timed steps
            # are compared.
            timer.timed_step_with_memory(c)
            if not fits(c, "measured "):
                continue
            pool.append(c)
            if chunk is None:
                continue
            if previous is not None and min(c.times) > CHUNK_STOP * min(previous.times):
                # Past the minimum, or one slow step: a second step of this chunk tells.
                if out_of_time():
                    timed_out = True
                    break
                c.times.append(timer.step(c))
                if min(c.times) > CHUNK_STOP * min(previous.times):
                    break  # smaller chunks only get slower
            previous = c
        alive = list(pool)
        r = 0
        while not timed_out:
            best = min(c.seconds for c in alive)
            alive = [c for c in alive if len(c.times) < 2 or min(c.times) <= DROP * best]
            rounds = min(len(c.times) for c in alive)
            if rounds >= repeats:
                best = min(c.seconds for c in alive)
                alive = [c for c in alive if c.seconds <= best * (1 + CLOSE)]
                if len(alive) == 1 or rounds >= repeats + extra:
                    break
            # Rotating the order keeps any first/last-in-round effect off one candidate.
            r += 1
            for c in alive[r % len(alive) :] + alive[: r % len(alive)]:
                if out_of_time():
                    timed_out = True
                    break
                c.times.append(timer.step(c))
    finally:
        for p in algo.parameters():
            p.grad = None
        algo.pre_adaptation_metrics = log_pre
    for c in pool:
        log.info("task_batching=auto measured %s", c.choice().describe())
    if budget is not None and not any(c.bytes <= budget for c in pool):
        log.warning(
            "task_batching=auto: nothing fits memory_budget_mb=%s; using the loop", memory_budget_mb
        )
    fastest = min(pool, key=lambda c: c.seconds)
    timer.select(fastest)
    chosen = fastest.choice()
    if timed_out:
        log.warning(
            "task_batching=auto: measuring stopped at its cap of %g s (a busy machine?); kept "
            "the fastest so far",
            max_seconds,
        )
    log.info(
        "task_batching=auto chose %s (measured in %.1f s); to make the same choice without "
        "measuring, e.g. to repeat this run bit for bit: %s",
        chosen.describe(),
        time.perf_counter() - start,
        chosen.overrides(),
    )
    return chosen
