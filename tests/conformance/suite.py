"""Run higher's own test suite (``../shared/conformance``) with every test seeded from its name.

Shared by ``tests/test_conformance.py`` and ``scripts/conformance_seeds.py``. The suite is
higher's code under its own licence and stays outside the repository; this only calls its
runner script, with ``seed_per_test`` (next to this file) loaded as a pytest plugin.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = HERE.parents[2] / "shared" / "conformance"
SCRIPT = SUITE / "run_higher_suite.sh"


@dataclass
class SuiteResult:
    counts: dict[str, int]
    # node id -> pytest's one-line reason, e.g. "AssertionError: False is not true : ..."
    failures: dict[str, str] = field(default_factory=dict)
    output: str = ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def counts_of(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line, e.g. ``1 failed, 173 passed in 75.5s``."""
    summary = [line for line in output.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    if not summary:
        return {}
    found = re.findall(r"(\d+) (passed|failed|errors?|deselected|skipped)", summary[-1])
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}


def failures_of(output: str) -> dict[str, str]:
    """``FAILED node - reason`` lines of pytest's short summary (``-rf``)."""
    found = {}
    for line in output.splitlines():
        m = re.match(r"(?:FAILED|ERROR) (\S+)(?: - (.*))?$", line)
        if m:
            found[m.group(1)] = m.group(2) or ""
    return found


def run_suite(
    python: str,
    *,
    module: str = "metarun.unroll",
    base_seed: int = 0,
    pytest_args: list[str] | tuple[str, ...] = (),
    timeout: float = 3600,
) -> SuiteResult:
    """Run the suite against ``module`` (``higher`` for the original) with seeds shifted by
    ``base_seed``; the same node id and base give the same draws under either module."""
    env = dict(os.environ)
    env["MODULE"] = module
    env["METARUN_CONFORMANCE_SEED"] = str(base_seed)
    env["COLUMNS"] = "1000"  # pytest cuts the summary's reasons to the terminal's width
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    res = subprocess.run(
        ["bash", str(SCRIPT), python, "-p", "seed_per_test", "-rfE", *pytest_args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    output = res.stdout + res.stderr
    return SuiteResult(counts_of(output), failures_of(output), output)


def select(nodes: list[str] | tuple[str, ...]) -> list[str]:
    """A ``-k`` expression that picks exactly these tests (parameterized names carry their
    index, so no name is a prefix of another's)."""
    names = sorted({node.rsplit("::", 1)[-1] for node in nodes})
    return ["-k", " or ".join(names)]
