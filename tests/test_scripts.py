"""The benchmark scripts behind the README's tables still run end to end (tiny settings; the
numbers themselves are only meaningful from full runs on a quiet machine)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from helpers import cli_env, run_captured

from metarun.testing import write_omniglot

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(script: str, *args: str, cwd: Path | None = None, **env: str) -> str:
    command = [sys.executable, str(SCRIPTS / script), *args]
    done = run_captured(command, cwd or SCRIPTS, env=cli_env(**env), timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _table(out: str) -> dict[str, list[str]]:
    """metarun-summary's Markdown rows by job: the cells after the job name."""
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


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


def test_compare_algorithms_sweeps_the_cpu_presets_into_one_summary(tmp_path: Path) -> None:
    """One row of each sweep (experiment=omniglot_cpu algo=..., experiment=omniglot_cpu_<algo>),
    on fake Omniglot archives, at --tiny sizes: metarun-summary's table over both sweeps."""
    data = tmp_path / "data"
    for stem, alphabets in (("images_background", 5), ("images_evaluation", 2)):
        names = {f"{stem}{i}": 10 for i in range(alphabets)}
        write_omniglot(data / "omniglot", stem, names, drawers=20)
    out = _run(
        "compare_algorithms.py", "--tiny", "--only", "anil", "protonets",
        "--data", str(data), "--out", str(tmp_path / "sweeps"),
        cwd=tmp_path, METARUN_CACHE=str(tmp_path / "cache"),
    )  # fmt: skip
    rows = _table(out)
    assert set(rows) == {"1_omniglot_cpu/0", "2_own_presets/0"}, out
    assert rows["1_omniglot_cpu/0"][:3] == ["done", "omniglot_cpu", "anil"], out
    assert rows["2_own_presets/0"][:2] == ["done", "omniglot_cpu_protonets"], out
    for cells in rows.values():  # test accuracy: mean ± 95% CI, after the 2 steps
        assert any(re.fullmatch(r"0\.\d+ ± [\d.e-]+", c) for c in cells) and "2" in cells, out
    assert (tmp_path / "sweeps" / "summary.md").is_file()
    assert "- protonets: Snell et al. 2017: 98.8%" in out
