"""higher's own test suite, run against ``metarun.unroll`` (the outside judge of the drop-in claim).

The suite lives outside the repository (``../shared/conformance``, higher's code under its own
licence); a user's clone has no such folder and this test skips.

Every test is seeded from its name (``conformance/seed_per_test.py``), so a run is reproducible.
higher's finite-difference gradient checks still fail on some draws for higher itself (about
one test in 100; ``scripts/conformance_seeds.py`` prints which, per seed): a metarun failure is
accepted only when real higher fails the same test the same way on the same draw.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conformance.suite import SCRIPT, SUITE, counts_of, failures_of, run_suite, select

HIGHER_PASSES = 159  # real higher 0.2.1 on torch 2.14.1 (../shared/conformance/README.md)

# Deliberate differences, explained in docs/unroll.md ("Conformance"):
DESELECTED = [
    # Asserts that Adam's result changes (beyond allclose) when the gradients are scaled by 0.1
    # or 0.2. Adam is scale invariant up to eps: torch.optim.Adam itself fails this assertion in
    # 22 of 60 random draws, and metarun matches torch.optim (the same 22). higher fails 2 of 60
    # because its Adam adds eps before the bias correction (an effective eps ~30x larger at
    # step 1). tests/test_unroll_compat.py::test_grad_callback_is_applied checks the callback.
    "test_optim.py::TestOptim::testDiffOptCallback_0_simple_model_adam",
]


def test_summary_parsers() -> None:
    out = (
        "FAILED test_optim.py::TestOptim::testA_1_x - AssertionError: False is not true : 20%\n"
        "ERROR test_patch.py::TestPatch::testB\n"
        "1 failed, 173 passed, 111 warnings in 75.55s (0:01:15)\n"
    )
    assert counts_of(out) == {"failed": 1, "passed": 173}
    assert counts_of("173 passed, 1 deselected, 2 errors in 9.1s") == {
        "passed": 173,
        "deselected": 1,
        "error": 2,
    }
    assert failures_of(out) == {
        "test_optim.py::TestOptim::testA_1_x": "AssertionError: False is not true : 20%",
        "test_patch.py::TestPatch::testB": "",
    }
    picked = select(["a.py::T::testA_1_x", "a.py::T::testB_10_y"])
    assert picked == ["-k", "testA_1_x or testB_10_y"]


def _unexplained(ours: dict[str, str], theirs: dict[str, str]) -> dict[str, str]:
    """metarun's failures that real higher does not fail with the same exception type on the
    same draw (higher's "not supported" ValueError for AdamW excuses nothing)."""

    def kind(why: str) -> str:
        return why.split(":", 1)[0]

    return {
        node: why
        for node, why in ours.items()
        if not (kind(why) and kind(why) == kind(theirs.get(node, "")))
    }


def test_only_a_failure_higher_shares_is_excused() -> None:
    threshold = "AssertionError: False is not true : Proportion ... below 60% threshold (20%)."
    ours = {"t::adam": threshold, "t::sgd": threshold, "t::adamw": threshold, "t::x": ""}
    theirs = {
        "t::adam": threshold.replace("20%", "10%"),  # the same check missed
        "t::adamw": "ValueError: Optimizer type AdamW not supported by higher yet.",
        "t::x": "",
    }
    assert _unexplained(ours, theirs) == {"t::sgd": threshold, "t::adamw": threshold, "t::x": ""}
    assert _unexplained({}, theirs) == {}


@pytest.mark.slow
def test_higher_suite_passes_against_metarun_unroll() -> None:
    if not SCRIPT.is_file():
        pytest.skip(
            f"higher's conformance suite not found at {SUITE} (it lives next to the "
            "metarun checkout in the development setup, not in the repository)"
        )
    args = [arg for test in DESELECTED for arg in ("--deselect", test)]
    ours = run_suite(sys.executable, pytest_args=args)
    assert ours.counts, f"no pytest summary line in the suite's output:\n{ours.tail()}"
    assert ours.counts.get("error", 0) == 0, ours.tail()
    unexplained = dict(ours.failures)
    # Without higher installed (make install has it) no failure can be excused.
    if ours.failures and importlib.util.find_spec("higher") is not None:
        theirs = run_suite(sys.executable, module="higher", pytest_args=select(list(ours.failures)))
        unexplained = _unexplained(ours.failures, theirs.failures)
    for node in sorted(set(ours.failures) - set(unexplained)):
        warnings.warn(f"{node} fails on this draw for real higher too", stacklevel=1)
    assert not unexplained, (
        f"failures that real higher does not share on the same draw: {unexplained}\n{ours.tail()}"
    )
    assert ours.counts.get("failed", 0) == len(ours.failures), ours.tail()
    assert ours.counts.get("passed", 0) >= HIGHER_PASSES, ours.tail()


@pytest.mark.slow
def test_conformance_seeds_script_compares_both_libraries() -> None:
    if not SCRIPT.is_file():
        pytest.skip(f"higher's conformance suite not found at {SUITE}")
    pytest.importorskip("higher", reason="the script runs real higher 0.2.1 (make install)")
    script = Path(__file__).resolve().parents[1] / "scripts" / "conformance_seeds.py"
    # On seed base 0 the first check misses for both libraries; higher has no AdamW.
    pick = "GradientCorrectness_10_share_weight_seq_model_adam or GradientCorrectness_15_"
    done = subprocess.run(
        [sys.executable, str(script), "--bases", "1", "-k", pick],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = re.search(r"^ +0 +(\d+) failed/(\d+) +(\d+) failed/(\d+) +-$", done.stdout, re.M)
    assert row is not None, done.stdout
    assert row.groups() == ("1", "2", "2", "2"), done.stdout
    assert "both fail: testGradientCorrectness_10_share_weight_seq_model_adam" in done.stdout
    assert "higher passes on the same draw: 0 in 1 bases" in done.stdout, done.stdout
