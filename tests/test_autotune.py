"""task_batching=auto picks a measured candidate, respects the memory budget, keeps numerics."""

from __future__ import annotations

import logging

import pytest
import torch

from metarun.algorithms.autotune import candidates, choose_task_batching, task_graph_bytes
from metarun.algorithms.maml import MAML
from metarun.data import FewShotTasks
from metarun.models import Conv4


def _setup(**maml_kwargs):
    torch.manual_seed(0)
    kwargs = {"inner_steps": 1, "eval_inner_steps": 1, **maml_kwargs}
    algo = MAML(Conv4(num_classes=3, hidden=4), task_type="classification", inner_lr=0.1, **kwargs)
    pool = torch.rand(8, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    batch = FewShotTasks(pool, 3, 1, 1).sample(4, torch.Generator().manual_seed(0))
    return algo, batch


def test_candidates() -> None:
    assert candidates(32) == [
        ("loop", None),
        ("vmap", None),
        ("vmap", 16),
        ("vmap", 8),
        ("vmap", 4),
        ("vmap", 2),
    ]


def test_choice_is_applied_and_gradients_discarded() -> None:
    algo, batch = _setup()
    choice = choose_task_batching(algo, batch, torch.device("cpu"), repeats=1)
    assert algo.task_batching.value == choice.mode
    assert algo.task_chunk_size == choice.chunk
    assert all(p.grad is None for p in algo.parameters())
    assert algo.pre_adaptation_metrics


def test_memory_budget_excludes_full_vmap() -> None:
    algo, batch = _setup()
    per_task = task_graph_bytes(algo, batch)
    assert per_task > 0
    # Room for 2.5 tasks' graphs: full vmap (4 tasks) is out, chunks of 2 or the loop are in.
    choice = choose_task_batching(
        algo, batch, torch.device("cpu"), memory_budget_mb=2.5 * per_task / 2**20, repeats=1
    )
    # Chunks of 2 may still be dropped if their measured resident peak is over the budget.
    assert choice.mode == "loop" or (choice.chunk == 2 and choice.bytes <= 2.5 * per_task)
    # A budget below any candidate's graph: falls back to the loop.
    choice = choose_task_batching(
        algo, batch, torch.device("cpu"), memory_budget_mb=1e-6, repeats=1
    )
    assert choice.mode == "loop"


class _Timed(torch.nn.Module):
    """Stands in for MAML with known step times per candidate on a simulated clock (``now``),
    so the choice and the dropping of slow candidates can be checked exactly however busy the
    machine is; records every step it runs."""

    def __init__(
        self,
        seconds: dict[tuple[str, int | None], float],
        first: dict[tuple[str, int | None], float] | None = None,
        slow: dict[tuple[str, int | None], dict[int, float]] | None = None,
    ) -> None:
        super().__init__()
        from metarun.spec.enums import TaskBatching

        self.w = torch.nn.Parameter(torch.ones(3))
        self.seconds = seconds
        self.first = dict(first or {})  # extra seconds of a candidate's first step
        # Extra seconds of a candidate's n-th step (0: its warm-up): a burst of load.
        self.slow = {key: dict(steps) for key, steps in (slow or {}).items()}
        self.task_batching, self.task_chunk_size = TaskBatching.loop, None
        self.pre_adaptation_metrics = True
        self.calls: list[tuple[str, int | None]] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def meta_train_step(self, batch) -> dict[str, float]:
        key = (self.task_batching.value, self.task_chunk_size)
        self.now += self.slow.get(key, {}).get(self.calls.count(key), 0.0)
        self.calls.append(key)
        self.now += self.seconds[key] + self.first.pop(key, 0.0)
        (self.w * self.w).sum().backward()  # something for task_graph_bytes to see
        return {}


def test_picks_the_fastest_and_stops_timing_clearly_slower_candidates() -> None:
    _, batch = _setup()  # 4 tasks: loop, full vmap, chunks of 2
    algo = _Timed({("loop", None): 0.004, ("vmap", None): 0.04, ("vmap", 2): 0.010})
    choice = choose_task_batching(algo, batch, torch.device("cpu"), repeats=3, clock=algo.clock)
    assert (choice.mode, choice.chunk) == ("loop", None)
    assert algo.task_batching.value == "loop" and algo.task_chunk_size is None
    # Full vmap is 10x slower: warm-up plus two timed steps (one step decides nothing), dropped.
    assert algo.calls.count(("vmap", None)) == 3
    # Chunks of 2 (2.5x) are dropped after two steps as well; the loop is timed every round.
    assert algo.calls.count(("vmap", 2)) == 3
    assert choice.rounds == 3


def _batch(tasks: int):
    pool = torch.rand(8, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return FewShotTasks(pool, 3, 1, 1).sample(tasks, torch.Generator().manual_seed(0))


def test_slow_first_calls_do_not_decide() -> None:
    """On CUDA the first step of a new shape can take 50x the next ones (kernel selection):
    only timed steps after the warm-up are compared."""
    algo = _Timed(
        {("loop", None): 0.03, ("vmap", None): 0.004, ("vmap", 2): 0.012},
        first={("vmap", None): 5.0},
    )
    choice = choose_task_batching(algo, _batch(4), torch.device("cpu"), clock=algo.clock)
    assert (choice.mode, choice.chunk) == ("vmap", None)
    # The loop (7.5x slower): its warm-up and two timed steps, no more.
    assert algo.calls.count(("loop", None)) == 3


def test_chunk_halving_stops_past_the_fastest_chunk() -> None:
    algo = _Timed(
        {
            ("loop", None): 0.03,
            ("vmap", None): 0.02,
            ("vmap", 16): 0.012,
            ("vmap", 8): 0.010,
            ("vmap", 4): 0.020,
            # No ("vmap", 2): running it would fail; chunks of 4 were 2x slower than of 8.
        }
    )
    choice = choose_task_batching(algo, _batch(32), torch.device("cpu"), clock=algo.clock)
    assert (choice.mode, choice.chunk) == ("vmap", 8)
    assert ("vmap", 2) not in algo.calls and ("vmap", 4) in algo.calls


# Issue 24, a busy machine: the loop's step takes 0.21 s quiet, and one of its steps 14.2 s; the
# vmap candidates are about 1.5x slower.
BUSY = {
    ("loop", None): 0.21,
    ("vmap", None): 0.32,
    ("vmap", 8): 0.31,
    ("vmap", 4): 0.33,
    ("vmap", 2): 0.40,
}


@pytest.mark.parametrize("slow_step", [1, 2, 3])
def test_one_slow_step_does_not_drop_the_fastest(slow_step: int) -> None:
    """Before: a candidate was timed once and dropped at 2x the best, so a slow first timed step
    of the loop chose vmap, 1.5x slower. Now a candidate needs two steps of its own to be dropped,
    and the choice is by medians: whichever of the loop's steps is slow, the loop wins."""
    algo = _Timed(BUSY, slow={("loop", None): {slow_step: 14.0}})
    choice = choose_task_batching(algo, _batch(16), torch.device("cpu"), clock=algo.clock)
    assert (choice.mode, choice.chunk) == ("loop", None)
    assert choice.seconds == pytest.approx(0.21)
    assert choice.rounds >= 3


def test_a_slow_step_does_not_end_the_chunk_search() -> None:
    """A slow step of the fastest chunk (8 tasks) looked past the minimum before; a second step
    of it says otherwise, and chunks of 4 and 2 are measured too."""
    seconds = {
        ("loop", None): 0.5,
        ("vmap", None): 0.4,
        ("vmap", 16): 0.3,
        ("vmap", 8): 0.2,
        ("vmap", 4): 0.25,
        ("vmap", 2): 0.35,
    }
    algo = _Timed(seconds, slow={("vmap", 8): {1: 3.0}})
    choice = choose_task_batching(algo, _batch(32), torch.device("cpu"), clock=algo.clock)
    assert (choice.mode, choice.chunk) == ("vmap", 8)
    assert ("vmap", 4) in algo.calls


def test_the_time_cap_keeps_the_fastest_so_far(caplog) -> None:
    """Three candidates within 5% of each other on a machine where every step takes 5 s: their
    extra rounds would take 105 s; the cap (30 s) stops the choice with the fastest median so
    far."""
    seconds = {("loop", None): 5.1, ("vmap", None): 5.0, ("vmap", 2): 5.2}
    uncapped = _Timed(seconds)
    choose_task_batching(
        uncapped, _batch(4), torch.device("cpu"), max_seconds=None, clock=uncapped.clock
    )
    assert uncapped.now > 100.0
    algo = _Timed(seconds)
    with caplog.at_level(logging.WARNING, logger="metarun.algorithms.autotune"):
        choice = choose_task_batching(
            algo, _batch(4), torch.device("cpu"), max_seconds=30.0, clock=algo.clock
        )
    assert (choice.mode, choice.chunk) == ("vmap", None)
    assert algo.now <= 30.0 + 5.2  # the cap, and at most the step that crossed it
    assert "measuring stopped at its cap of 30 s" in caplog.text


def test_a_cap_reached_during_the_first_candidates_keeps_what_was_timed() -> None:
    """The loop's warm-up and one timed step always run; nothing after the cap does."""
    algo = _Timed({("loop", None): 0.5, ("vmap", None): 0.1, ("vmap", 2): 0.1})
    choice = choose_task_batching(
        algo, _batch(4), torch.device("cpu"), max_seconds=0.9, clock=algo.clock
    )
    assert (choice.mode, choice.chunk) == ("loop", None)
    assert algo.calls == [("loop", None), ("loop", None)]
    assert algo.task_batching.value == "loop"


def test_close_candidates_get_extra_rounds() -> None:
    _, batch = _setup()
    algo = _Timed({("loop", None): 0.010, ("vmap", None): 0.010, ("vmap", 2): 0.025})
    choose_task_batching(
        algo, batch, torch.device("cpu"), repeats=2, max_extra_rounds=3, clock=algo.clock
    )
    # Equally fast: both stay through the 2 rounds and the 3 extra ones (plus warm-up).
    assert algo.calls.count(("vmap", None)) == 1 + 2 + 3
    assert algo.calls.count(("vmap", 2)) == 1 + 2


def test_candidates_over_the_memory_budget_are_never_run() -> None:
    algo, batch = _setup()
    per_task = task_graph_bytes(algo, batch)
    ran: list[tuple[str, int | None]] = []
    step = algo.meta_train_step

    def recording(b):
        ran.append((algo.task_batching.value, algo.task_chunk_size))
        return step(b)

    algo.meta_train_step = recording  # type: ignore[method-assign]
    choose_task_batching(
        algo, batch, torch.device("cpu"), memory_budget_mb=2.5 * per_task / 2**20, repeats=1
    )
    assert ("vmap", None) not in ran
    assert ("vmap", 2) in ran and ("loop", None) in ran


def test_checkpointed_inner_steps_go_straight_to_the_loop() -> None:
    algo, batch = _setup(inner_steps=2, task_batching="loop", checkpoint_inner=True)
    ran: list[str] = []
    algo.meta_train_step = lambda b: ran.append("step")  # type: ignore[method-assign]
    choice = choose_task_batching(algo, batch, torch.device("cpu"))
    assert (choice.mode, choice.chunk) == ("loop", None) and ran == []  # nothing measured
    assert algo.task_batching.value == "loop"
