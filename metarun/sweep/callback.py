"""Hydra callbacks (``conf/config.yaml``: ``hydra.callbacks``): :class:`RunDirCheck`, which
refuses a run dir that cannot be created before Hydra tries, and :class:`SweepSummary`, which
records each sweep job's status and keeps the sweep's summary table current.

In a multirun each job writes ``<run dir>/status.json`` when it starts (``running``, with its
pid and host) and when it ends (``done`` / ``stopped`` / ``failed`` with the error), then
rewrites ``<sweep dir>/summary.{csv,md}`` (:mod:`metarun.sweep.summary`). The sweep rewrites it
once more when all jobs have returned. Writing after every job matters: Hydra skips
``on_multirun_end`` when a job failed, and a job on a cluster may be the last one alive.

Single runs (no ``-m``) are left alone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from metarun.sweep.summary import RESULTS_FILE, STATUS_FILE, read_json, write_summary

logger = logging.getLogger(__name__)

_MAX_ERROR = 500  # characters of a failed job's error kept in status.json and the table


_sweep_dir: Path | None = None  # the sweep this process launched (see jobs_started)
# The run dir a single run is about to get, whether it existed, and the folders Hydra is about
# to create for it (see discard_run_dir).
_planned_run: tuple[Path, bool, list[Path]] | None = None
# What Hydra writes into every run dir before the task starts.
_HYDRA_FILES = (
    Path(".hydra") / "config.yaml",
    Path(".hydra") / "hydra.yaml",
    Path(".hydra") / "overrides.yaml",
)


def forget_sweep() -> None:
    """A new command starts (``metarun.cli.main`` run twice in one process, as tests do): no
    sweep or run dir of an earlier command counts for :func:`jobs_started` or
    :func:`discard_run_dir`."""
    global _sweep_dir, _planned_run
    _sweep_dir = None
    _planned_run = None


def jobs_started() -> bool:
    """Whether a job of the sweep this process launched has started (written its status file).

    ``metarun.cli`` reads it: Hydra exits with 1 both for a config it cannot compose and for a
    failed job; only the first is a usage error (status 2). Jobs run by joblib or submitit run
    in other processes, so the files they write are what this process can see."""
    return _sweep_dir is not None and any(_sweep_dir.glob(f"*/{STATUS_FILE}"))


class JobFailed(CompactHydraException):
    """A sweep job stopped by a user mistake (config, data, checkpoint) or by divergence.

    It is already reported (``error: ...`` on stderr and in the job's ``metarun.log``); raised
    so that Hydra marks the job failed. As a ``CompactHydraException`` Hydra ends the sweep by
    printing its message alone, without the traceback of the task function.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"error: {message}")
        self.kind = kind  # the original exception's class name, for the summary's note
        self.message = message

    def __reduce__(self) -> tuple[type[JobFailed], tuple[str, str]]:
        # Launchers that run jobs in other processes (joblib, submitit) pickle it back.
        return type(self), (self.kind, self.message)


class UnusableDirError(SystemExit):
    """A run or sweep dir that cannot be created or written. A ``SystemExit``: Hydra turns any
    ``Exception`` in a callback into a warning and goes on to fail in its own ``mkdir``;
    ``metarun.cli`` prints :attr:`message` as ``error: ...`` and exits with 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def check_writable_dir(path: str | Path, key: str) -> None:
    """Create ``path`` (and a file in it) as Hydra is about to, then remove what was created:
    Hydra resolves ``${now:...}`` again when it creates the dir, possibly a second later.

    Raises:
        UnusableDirError: naming the path, the key that set it and the reason.
    """
    path = Path(path)
    created: list[Path] = []
    try:
        missing, existing = [], path
        while not existing.exists() and existing != existing.parent:
            missing.append(existing)
            existing = existing.parent
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        fd, probe = tempfile.mkstemp(prefix=".metarun-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UnusableDirError(
            f"{key}={str(path)!r} cannot be used as an output folder ({reason}: "
            f"{error.filename or path}); set {key}=<a folder you can write to>"
        ) from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # something appeared in it meanwhile: keep it
                folder.rmdir()


class RunDirCheck(Callback):
    """``hydra.run.dir`` under ``/proc``, below a file, or in a read-only folder: an ``error:``
    naming the key instead of the traceback of Hydra's own ``mkdir``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _planned_run
        if not HydraConfig.initialized():
            # ${name} reads ${hydra:runtime.choices.*}; Hydra sets this itself in run_job.
            HydraConfig.instance().set_config(config)
        path = Path(config.hydra.run.dir).absolute()
        missing = [p for p in (path, *path.parents) if not p.exists()]
        _planned_run = (path, path.exists(), missing)
        check_writable_dir(path, "hydra.run.dir")


def discard_run_dir(run_dir: str | Path) -> bool:
    """Remove the run dir of a single run that failed before it wrote anything, and the folders
    created for it (``outputs/<name>/``) if they are empty now: a mistake on the command line
    leaves nothing behind.

    Only a dir this command created (it did not exist when :class:`RunDirCheck` looked) and
    that holds nothing but Hydra's ``.hydra/*.yaml`` and the log is removed; anything else
    stays, e.g. ``hydra.run.dir=<an existing folder>`` or a run that failed in training.

    Returns:
        Whether it was removed.
    """
    if _planned_run is None:
        return False
    planned, existed, created = _planned_run
    run_dir = Path(run_dir).absolute()
    # Hydra resolves ${now:...} again when it creates the dir: the same dir, or a sibling of
    # the one planned a second later.
    ours = (run_dir == planned or run_dir.parent == planned.parent) and not existed
    expected = {run_dir / ".hydra", *(run_dir / f for f in _HYDRA_FILES)}
    if HydraConfig.initialized():
        expected.add(run_dir / f"{HydraConfig.get().job.name}.log")
    found = set(run_dir.rglob("*"))
    if not ours or not found <= expected:
        return False
    _close_file_logs(run_dir)
    try:
        for path in found - {run_dir / ".hydra"}:
            path.unlink()
        for folder in (run_dir / ".hydra", run_dir):
            if folder.exists():
                folder.rmdir()
    except OSError as error:
        logger.debug("could not remove the run dir %s: %s", run_dir, error)
        return False
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        if folder in run_dir.parents:
            with contextlib.suppress(OSError):  # not empty: another run is in it
                folder.rmdir()
    return True


def _close_file_logs(run_dir: Path) -> None:
    """Hydra's log file handler still holds ``<run dir>/<job>.log`` open."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and run_dir in Path(handler.baseFilename).parents
        ):
            root.removeHandler(handler)
            handler.close()


class SweepSummary(Callback):
    """Job status files and the sweep summary (see the module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir
        if not HydraConfig.initialized():
            # Hydra sets HydraConfig only when a job starts, but resolves hydra.sweep.dir in this
            # process before that; ours is named after ${name}, which reads
            # ${hydra:runtime.choices.*} ("HydraConfig was not set", Hydra issue #3427).
            HydraConfig.instance().set_config(config)
        _sweep_dir = Path(config.hydra.sweep.dir)
        _pin_sweep_dir(config, str(_sweep_dir))
        check_writable_dir(_sweep_dir, "hydra.sweep.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        previous = read_json(run_dir / STATUS_FILE)
        _write_status(
            run_dir,
            {
                "status": "running",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "job_id": str(config.hydra.job.get("id", "")),
                # A requeued job (preemption, time limit) starts again in the same run dir.
                "attempt": int(previous.get("attempt", 0)) + 1 if previous else 1,
                "started": _now(),
            },
        )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        record = read_json(run_dir / STATUS_FILE) or {}
        record["ended"] = _now()
        if job_return.status is JobStatus.COMPLETED:
            results = read_json(run_dir / RESULTS_FILE) or {}
            record["status"] = "stopped" if results.get("stopped_by") else "done"
            record.pop("error", None)
        else:
            error = job_return._return_value  # the property would re-raise it
            record["status"] = "failed"
            note = (
                f"{error.kind}: {error.message}"
                if isinstance(error, JobFailed)
                else f"{type(error).__name__}: {error}"
            )
            record["error"] = note[:_MAX_ERROR]
        _write_status(run_dir, record)
        _summarize(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            paths = _summarize(sweep_dir)
            if paths:
                logger.info("sweep summary: %s, %s", *paths)


def _pin_sweep_dir(config: DictConfig, sweep_dir: str) -> None:
    """Every job composes its own config, and would resolve ``hydra.sweep.dir`` from its own
    ``${name}``: a sweep over ``algo`` would scatter its jobs over several sweep dirs. Hydra
    composes each job with the sweep's Hydra overrides, so one naming the sweep's dir keeps them
    together."""
    overrides = config.hydra.overrides.hydra
    if any(str(o).startswith("hydra.sweep.dir=") for o in overrides):
        return  # given on the command line: the same for every job already
    quoted = sweep_dir.replace("\\", "\\\\").replace("'", "\\'")
    with read_write(config.hydra), open_dict(config.hydra):
        overrides.append(f"hydra.sweep.dir='{quoted}'")


def _in_sweep(config: DictConfig) -> bool:
    # A job of several SLURM tasks (torch.distributed) runs this in every task: rank 0 reports.
    rank = os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))
    return config.hydra.mode == RunMode.MULTIRUN and rank in ("", "0")


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_status(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / STATUS_FILE)


def _summarize(sweep_dir: Path) -> tuple[Path, Path] | None:
    try:
        csv_path, md_path, _ = write_summary(sweep_dir)
    except Exception as error:  # noqa: BLE001
        # A table that cannot be written (full disk, an odd file in the sweep dir) must not
        # fail the job whose results are safe on disk; metarun-summary can write it later.
        logger.warning("could not write the sweep summary in %s: %s", sweep_dir, error)
        return None
    return csv_path, md_path
