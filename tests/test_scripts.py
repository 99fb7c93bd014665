"""The benchmark scripts behind the README's tables still run end to end (tiny settings; the
numbers themselves are only meaningful from full runs on a quiet machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_unroll_prints_ratios_to_the_reference() -> None:
    out = _run("bench_unroll.py", "--meta-batch", "2", "--repeats", "1", "--steps", "1")
    for order in ("second", "first"):
        row = re.search(rf"1 +{order} +metarun +([\d.]+) +([\d.]+)", out)
        assert row is not None, out
        assert float(row.group(1)) > 0 and float(row.group(2)) > 0


def test_bench_batching_prints_both_tables() -> None:
    out = _run(
        "bench_batching.py",
        "--meta-batch", "4", "--queries", "1", "--steps", "1", "--repeats", "1",
        "--auto-repeats", "1", "--ckpt-steps", "1", "--ckpt-meta-batch", "2",
        "--ckpt-queries", "1",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if re.match(r"\| 1 \| 1 \| (first|second) \|", line)]
    assert len(rows) == 2, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[7] in {"loop", "vmap/all", "vmap/2"}  # auto's choice
        assert float(cells[8]) > 0  # auto / faster of loop and full vmap
    ckpt = re.search(r"\| 1 \| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+ \|", out)
    assert ckpt is not None and int(ckpt.group(1)) > 0 and int(ckpt.group(2)) > 0, out
