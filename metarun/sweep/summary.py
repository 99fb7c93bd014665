"""The table of a sweep: one row per job with its overrides, status and final metrics.

A Hydra multirun (``metarun -m ...``) writes one run dir per job under the sweep dir
(``multirun/<name>/<time>/<job number>/``). :func:`write_summary` reads them and writes
``summary.csv`` and ``summary.md`` into the sweep dir; the Hydra callback
(:mod:`metarun.sweep.callback`) does it as jobs end, ``metarun-summary DIR`` for any sweep dir.

A job's status:

* ``done``: ``results.json`` holds the final test.
* ``stopped``: a signal ended training early (``results.json`` has ``stopped_by``, e.g. SIGTERM
  from ``scancel``); the checkpoint is saved, and the job continues when run again.
* ``failed``: the job raised (the note column has the error).
* ``running``: started, not ended; ``killed`` when its process is gone from this host without
  having reported an end (e.g. SIGKILL, out of memory).
* ``incomplete``: a run dir with neither results nor a recorded start (the sweep ran without
  the callback, or the job died before its task started).

Nothing here imports torch: the command is quick on a login node.

Example::

    metarun-summary multirun/maml_sinusoid/2024-01-01_12-00-00
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metarun import plotting

RESULTS_FILE = "results.json"  # written by metarun.runner.results
STATUS_FILE = "status.json"  # written by metarun.sweep.callback
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
_OVERRIDES = Path(".hydra") / "overrides.yaml"
_LOCK = ".summary.lock"


@dataclass
class JobRow:
    """One job of a sweep."""

    job: str  # its run dir relative to the sweep dir, e.g. "3"
    status: str  # done | stopped | failed | running | killed | incomplete
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""  # the error of a failed job, the signal that stopped one, ...


# ------------------------------------------------------------------------------------ objective


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of a job, or None where it is missing, unreadable or not an object
    (a job killed while writing)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def objective(results: dict[str, Any]) -> float:
    """The number a hyperparameter search minimises: the validation error at the best
    validation step, ``val/loss`` for regression and ``1 - val/accuracy`` for classification.

    Lower is better for every task type, so one Optuna preset (``direction: minimize``) serves
    all datasets. NaN (a failed Optuna trial) when the run has no validation result: stopped
    early, ``eval.every=0`` or larger than ``outer_steps``, or ``mode=eval``.

    Args:
        results: the content of a run's ``results.json`` (``RunSummary.results``).
    """
    best = results.get("best")
    if results.get("stopped_by") or not best:
        return math.nan
    value = float(best["value"])
    return 1.0 - value if best["metric"].endswith("accuracy") else value


# ----------------------------------------------------------------------------------------- jobs


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Run dirs under ``sweep_dir`` (those holding Hydra's ``.hydra/overrides.yaml``), in job
    order (numerically where the names are numbers, as Hydra's default ``hydra.job.num``)."""
    sweep_dir = Path(sweep_dir)
    jobs = [
        path.parent.parent
        for path in sweep_dir.glob(f"**/{_OVERRIDES}")
        if ".submitit" not in path.relative_to(sweep_dir).parts
    ]

    def order(job: Path) -> tuple[Any, ...]:
        parts = job.relative_to(sweep_dir).parts
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)

    return sorted(jobs, key=order)


def read_overrides(job_dir: Path) -> dict[str, str]:
    """``{"algo.inner_lr": "0.1", "seed": "2"}`` from the job's ``.hydra/overrides.yaml``."""
    try:
        listed = yaml.safe_load((job_dir / _OVERRIDES).read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return {}
    overrides = {}
    for item in listed:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def job_status(job_dir: Path) -> tuple[str, str]:
    """``(status, note)`` of the job in ``job_dir`` (see the module docstring)."""
    recorded = read_json(job_dir / STATUS_FILE)
    results_path = job_dir / RESULTS_FILE
    results = read_json(results_path)
    if recorded is not None and recorded.get("status") == "failed":
        return "failed", str(recorded.get("error", ""))
    if recorded is not None and recorded.get("status") == "running":
        # A later results.json means this attempt ended without reporting back: requeued by
        # submitit after a preemption signal (the process exits at once), or killed after
        # writing its results.
        ended = results is not None and (
            results_path.stat().st_mtime >= (job_dir / STATUS_FILE).stat().st_mtime
        )
        if not ended:
            pid, host = recorded.get("pid"), recorded.get("host")
            if isinstance(pid, int) and host == socket.gethostname() and not _alive(pid):
                return "killed", f"process {pid} ended without reporting (SIGKILL? out of memory?)"
            return "running", f"pid {pid} on {host}"
    if results is not None:
        if results.get("stopped_by"):
            return "stopped", f"stopped by {results['stopped_by']} after step {results.get('step')}"
        return "done", ""
    if recorded is not None:
        return str(recorded.get("status")), str(recorded.get("error", ""))
    return "incomplete", f"no {RESULTS_FILE}"


def final_metrics(results: dict[str, Any] | None) -> dict[str, float]:
    """``step``, the best validation value (``val/best_loss`` or ``val/best_accuracy``) and the
    test metrics with their 95% CIs (``test/loss``, ``test/loss_ci95``, ...) of ``results``."""
    if results is None:
        return {}
    metrics: dict[str, float] = {}
    if isinstance(results.get("step"), int):
        metrics["step"] = results["step"]
    best = results.get("best")
    if best:
        metrics[best["metric"].replace("/", "/best_", 1)] = float(best["value"])
    test = results.get("test") or {}
    for name, stat in (test.get("metrics") or {}).items():
        metrics[f"test/{name}"] = float(stat["mean"])
        metrics[f"test/{name}_ci95"] = float(stat["ci95"])
    return metrics


def summarize(sweep_dir: str | Path) -> list[JobRow]:
    """One :class:`JobRow` per job under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job_dir in find_jobs(sweep_dir):
        status, note = job_status(job_dir)
        rows.append(
            JobRow(
                job=job_dir.relative_to(sweep_dir).as_posix(),
                status=status,
                overrides=read_overrides(job_dir),
                metrics=final_metrics(read_json(job_dir / RESULTS_FILE)),
                note=note,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------- table


def _columns(rows: Sequence[JobRow]) -> tuple[list[str], list[str]]:
    """Override keys in order of first appearance; metric names: ``step``, best validation,
    test metrics after adaptation, then before (``test/pre_*``)."""
    keys: dict[str, None] = {}
    names: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row.overrides))
        names.update(dict.fromkeys(row.metrics))

    def order(name: str) -> int:
        if name == "step":
            return 0
        if name.startswith("val/"):
            return 1
        return 3 if name.startswith("test/pre_") else 2

    return list(keys), sorted(names, key=order)  # stable: first appearance within a kind


def format_csv(rows: Sequence[JobRow]) -> str:
    """CSV: ``job, status, <override keys>, <metrics>, note`` (full precision; empty = none)."""
    keys, names = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["job", "status", *keys, *names, "note"])
    for row in rows:
        writer.writerow(
            [
                row.job,
                row.status,
                *(row.overrides.get(k, "") for k in keys),
                *(repr(row.metrics[n]) if n in row.metrics else "" for n in names),
                row.note,
            ]
        )
    return out.getvalue()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_markdown(rows: Sequence[JobRow], title: str = "") -> str:
    """Markdown table; test metrics as ``mean ± ci95``, numbers to 4 significant digits.
    Overrides that every job shares are listed above the table, not as columns."""
    all_keys, names = _columns(rows)
    fixed = {
        key: rows[0].overrides[key]
        for key in all_keys
        if len(rows) > 1
        and key in rows[0].overrides
        and all(row.overrides.get(key) == rows[0].overrides[key] for row in rows)
    }
    keys = [key for key in all_keys if key not in fixed]
    shown = [n for n in names if not (n.endswith("_ci95") and n[: -len("_ci95")] in names)]
    header = ["job", "status", *keys, *shown, "note"]
    lines = [f"# {title}", ""] if title else []
    if fixed:
        lines += ["All jobs: `" + " ".join(f"{k}={v}" for k, v in fixed.items()) + "`", ""]
    lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [row.job, row.status, *(row.overrides.get(k, "") for k in keys)]
        for name in shown:
            value = row.metrics.get(name)
            if value is None:
                cells.append("")
                continue
            text = str(value) if name == "step" else f"{value:.4g}"
            ci = row.metrics.get(f"{name}_ci95")
            cells.append(f"{text} ± {ci:.2g}" if ci is not None else text)
        cells.append(row.note)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    lines += ["", f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Serialises summary writers (parallel jobs ending together), so that the last one to
    write has also read last. Where the file system has no locks (some NFS), unlocked."""
    try:
        import fcntl

        handle = (sweep_dir / _LOCK).open("a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path, list[JobRow]]:
    """Write ``summary.csv`` and ``summary.md`` into ``sweep_dir``.

    Returns:
        The two paths and the rows.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir {str(sweep_dir)!r} does not exist")
    with _locked(sweep_dir):
        rows = summarize(sweep_dir)
        csv_path, md_path = sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD
        _write_atomic(csv_path, format_csv(rows))
        _write_atomic(md_path, format_markdown(rows, title=f"Sweep {sweep_dir}"))
    return csv_path, md_path, rows


# ----------------------------------------------------------------------------------------- plot


def swept_keys(rows: Sequence[JobRow]) -> list[str]:
    """The override keys whose values differ between jobs, in order of first appearance."""
    keys, _ = _columns(rows)
    return [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1]


def sweep_points(
    rows: Sequence[JobRow], *, x: str | None = None, metric: str | None = None
) -> tuple[str, str, dict[str, list[tuple[Any, float, float]]]]:
    """What :func:`plot_summary` draws: the finished jobs' ``metric`` against the swept key
    ``x``, one series per value of the other swept keys (seeds excepted).

    A job's point is its test mean with the 95% CI over its test tasks; jobs that differ only by
    ``seed`` are one point: the mean of their means with the 95% CI over seeds
    (``1.96 * std / sqrt(n)``).

    Args:
        x: the key on the x axis (default: the first swept key other than ``seed``).
        metric: default ``test/accuracy`` where the jobs have it, else ``test/loss``.

    Returns:
        ``(x, metric, {series label: [(x value, mean, ci95), ...]})``; x values are floats when
        every one is a number, else strings.

    Raises:
        ValueError: no finished job with the metric, nothing swept, or an unknown ``x``.
    """
    done = [r for r in rows if r.status == "done" and r.metrics]
    if metric is None:
        metric = "test/accuracy" if any("test/accuracy" in r.metrics for r in done) else "test/loss"
    done = [r for r in done if metric in r.metrics]
    if not done:
        names = sorted({n for r in rows for n in r.metrics if not n.endswith("_ci95")})
        raise ValueError(
            f"no finished job has {metric} to plot (metrics found: {', '.join(names) or 'none'})"
        )
    swept = swept_keys(done)
    if x is None:
        candidates = [k for k in swept if k != "seed"] or swept
        if not candidates:
            raise ValueError("the finished jobs share every override: nothing swept to plot")
        x = candidates[0]
    elif x not in {k for r in done for k in r.overrides}:
        raise ValueError(
            f"{x!r} is not an override of the finished jobs (swept keys: "
            f"{', '.join(swept) or 'none'}; choose one with --x KEY)"
        )
    others = [k for k in swept if k not in (x, "seed")]
    groups: dict[tuple[str, str], list[JobRow]] = {}
    for row in done:
        label = ", ".join(f"{k}={row.overrides.get(k, '')}" for k in others)
        groups.setdefault((label, row.overrides.get(x, "")), []).append(row)
    numeric = all(_is_number(value) for _, value in groups)
    series: dict[str, list[tuple[Any, float, float]]] = {}
    for (label, value), jobs in groups.items():
        means = [r.metrics[metric] for r in jobs]
        mean = sum(means) / len(means)
        if len(jobs) == 1:
            ci = jobs[0].metrics.get(f"{metric}_ci95", 0.0)
        else:
            var = sum((m - mean) ** 2 for m in means) / (len(means) - 1)
            ci = 1.96 * math.sqrt(var / len(means))
        series.setdefault(label, []).append((float(value) if numeric else value, mean, ci))
    return x, metric, series


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def plot_summary(
    rows: Sequence[JobRow],
    path: str | Path,
    *,
    x: str | None = None,
    metric: str | None = None,
    title: str = "",
) -> Path | None:
    """Write a PNG of the test metric against the swept key with 95% CIs
    (:func:`sweep_points`).

    Returns:
        ``path``, or None when matplotlib is not installed (nothing written; the tables are).

    Raises:
        ValueError: see :func:`sweep_points`.
    """
    x, metric, series = sweep_points(rows, x=x, metric=metric)
    if plotting.pyplot() is None:
        return None
    n = sum(len(points) for points in series.values())
    fig = plotting.sweep_plot(
        series,
        x_label=x,
        y_label=f"{metric} (mean ± 95% CI)",
        title=f"{metric} against {x} ({n} points)" + (f"\n{title}" if title else ""),
    )
    path = Path(path)
    plotting.save_png(plotting.rgba(fig, dpi=120), path)
    return path


# -------------------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    """``metarun-summary DIR``: (re)write DIR's summary and print it as Markdown."""
    parser = argparse.ArgumentParser(
        prog="metarun-summary",
        description="Summarise a metarun sweep (metarun -m ...): one row per job with its "
        f"overrides, status and final metrics, written to DIR/{SUMMARY_CSV} and "
        f"DIR/{SUMMARY_MD}.",
    )
    parser.add_argument(
        "sweep_dir", metavar="DIR", help="the sweep dir, e.g. multirun/<name>/<time>"
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        type=Path,
        help="also draw the test metric against the swept key with 95%% CIs into PNG "
        f"(needs matplotlib: {plotting.INSTALL_HINT})",
    )
    parser.add_argument(
        "--x",
        metavar="KEY",
        help="the swept key on the plot's x axis (default: the first "
        "override that differs between jobs, seeds last; jobs differing only by seed are "
        "averaged)",
    )
    parser.add_argument(
        "--metric",
        metavar="NAME",
        help="the plotted metric (default: test/accuracy, or test/loss for regression)",
    )
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: sweep dir {str(sweep_dir)!r} does not exist", file=sys.stderr)
        return 2
    if not find_jobs(sweep_dir):
        print(
            f"error: no jobs under {str(sweep_dir)!r} (a job's run dir holds {_OVERRIDES}; "
            "pass the sweep dir, e.g. multirun/<name>/<time>)",
            file=sys.stderr,
        )
        return 2
    csv_path, md_path, rows = write_summary(sweep_dir)
    print(md_path.read_text(encoding="utf-8"), end="")
    print(f"written: {csv_path}, {md_path}")
    if args.plot is not None:
        try:
            plot = plot_summary(
                rows, args.plot, x=args.x, metric=args.metric, title=f"Sweep {sweep_dir}"
            )
        except ValueError as error:
            print(f"error: --plot: {error}", file=sys.stderr)
            return 2
        if plot is None:
            print(f"warning: {plotting.missing(str(args.plot))}", file=sys.stderr)
        else:
            print(f"written: {plot}")
    return 0


def console_main() -> None:
    """Console-script entry point (``metarun-summary``)."""
    raise SystemExit(main())


if __name__ == "__main__":
    console_main()
