"""Sweeps: Hydra multirun with the summary callback, Optuna, joblib and submitit launchers,
preemption and requeue (submitit on this machine, and SLURM through fake sbatch/srun/scontrol).

The launcher and sweeper plugins come with the extras ``metarun[sweep]`` / ``metarun[cluster]``;
tests that need one are skipped without it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from metarun.config import ConfigError
from metarun.runner import api
from metarun.runner.checkpoint import load_checkpoint
from metarun.sweep import summary
from metarun.sweep.summary import objective

METARUN = str(Path(sys.executable).with_name("metarun"))
SUMMARY = str(Path(sys.executable).with_name("metarun-summary"))

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _needs(module: str, extra: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} not installed (pip install 'metarun[{extra}]')",
    )


needs_optuna = _needs("hydra_plugins.hydra_optuna_sweeper", "sweep")
needs_joblib = _needs("hydra_plugins.hydra_joblib_launcher", "sweep")
needs_submitit = _needs("hydra_plugins.hydra_submitit_launcher", "cluster")


def _env(**extra: str) -> dict[str, str]:
    """One thread per process: parallel jobs on 2 cores, and equal float results between
    processes (see tests/test_cli.py)."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _metarun(args, cwd, timeout=180, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [METARUN, "-m", *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def in_process(monkeypatch):
    """``in_process(args)``: ``metarun -m *args`` in this process (no start-up cost), returning
    the exit status; the logging set-up Hydra leaves behind is undone afterwards."""
    import logging

    from metarun import cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def _run(args: list[str]) -> int:
        monkeypatch.setattr(sys, "argv", ["metarun", "-m", *args])
        try:
            cli.main()
        except SystemExit as exit_:
            return int(exit_.code or 0)
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
        return 0

    return _run


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["algorithm"]


# ------------------------------------------------------------------------- basic launcher, table


def test_basic_sweep_writes_run_dirs_summary_and_hparams(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    result = _metarun(["algo=maml,fomaml", "seed=0,1", *tiny, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr

    rows = _rows(sweep)
    assert [(r["job"], r["algo"], r["seed"], r["status"]) for r in rows] == [
        ("0", "maml", "0", "done"),
        ("1", "maml", "1", "done"),
        ("2", "fomaml", "0", "done"),
        ("3", "fomaml", "1", "done"),
    ]
    for row in rows:
        results = json.loads((sweep / row["job"] / "results.json").read_text())
        assert float(row["test/loss"]) == results["test"]["metrics"]["loss"]["mean"]
        assert float(row["val/best_loss"]) == results["best"]["value"]
        assert int(row["step"]) == 6 and row["outer_steps"] == "6"
        assert json.loads((sweep / row["job"] / "status.json").read_text())["status"] == "done"
    markdown = (sweep / "summary.md").read_text()
    assert "| job | status | algo | seed | step | val/best_loss | test/loss |" in markdown
    assert "All jobs: `outer_steps=6" in markdown and "4 jobs: 4 done" in markdown

    # TensorBoard's HParams view: each job's hparams hold the swept values, group options
    # included, and the best validation loss is a metric (tensorboard --logdir <sweep dir>).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    seen = []
    for row in rows:
        acc = EventAccumulator(str(sweep / row["job"] / "tb"))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        ).session_start_info.hparams
        experiment = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/experiment"]
        ).experiment
        metrics = {m.name.tag for m in experiment.metric_infos}
        # No discrete domains (one job's values only), which would filter out other jobs' rows.
        assert not any(info.HasField("domain_discrete") for info in experiment.hparam_infos)
        assert {"hparam/val/best_loss", "hparam/loss"} <= metrics
        seen.append((start["algo"].string_value, start["seed"].number_value))
        assert start["algo.inner_lr"].number_value == pytest.approx(0.01)
    assert seen == [("maml", 0), ("maml", 1), ("fomaml", 0), ("fomaml", 1)]

    # The command rebuilds the same table for an existing sweep dir.
    before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    (sweep / "summary.md").unlink()
    shown = subprocess.run([SUMMARY, str(sweep)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert (sweep / "summary.csv").read_text() == before
    assert "| 3 | done | fomaml | 1 |" in shown.stdout


@pytest.mark.parametrize(
    "launcher",
    [
        [],
        # Jobs in worker processes: the exit status must still say "a job failed" (1), not
        # "bad command line" (2).
        pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], marks=needs_joblib),
    ],
    ids=["basic", "joblib"],
)
def test_a_failing_job_is_reported_and_the_others_run(tmp_path, tiny, launcher):
    sweep = tmp_path / "sweep"
    result = _metarun(
        ["algo.inner_steps=0,1", *tiny, *launcher, f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert result.returncode == 1  # Hydra reports the failed job after the batch
    message = "error: algo.inner_steps must be >= 1, got 0"
    assert message in result.stderr
    assert "Traceback" not in result.stderr  # as in a single run
    rows = _rows(sweep)
    assert [(r["algo.inner_steps"], r["status"]) for r in rows] == [("0", "failed"), ("1", "done")]
    assert rows[0]["note"].startswith("ConfigError: algo.inner_steps must be >= 1, got 0")
    assert rows[0]["test/loss"] == "" and float(rows[1]["test/loss"]) > 0
    # A cluster job's log is what its user reads: it says why the job stopped.
    assert message in (sweep / "0" / "metarun.log").read_text()


def test_a_job_whose_options_do_not_fit_fails_with_an_error_line(tmp_path, tiny):
    """The issue's `metarun -m algo=l2rw dataset=omniglot`, beside a job that runs: the failed
    job prints `error: ...` as a single run does, not Hydra's traceback."""
    sweep = tmp_path / "sweep"
    result = _metarun(["algo=l2rw,maml", *tiny, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 1, result.stderr
    assert "error: algo=l2rw does not fit dataset=sinusoid" in result.stderr
    assert "Traceback" not in result.stderr
    rows = _rows(sweep)
    assert [(r["algo"], r["status"]) for r in rows] == [("l2rw", "failed"), ("maml", "done")]
    assert rows[0]["note"].startswith("ConfigError: algo=l2rw does not fit dataset=sinusoid")


@pytest.mark.parametrize("bad", ["algo.inner_steps=1,x", "algo.no_such_key=1,2"])
def test_a_sweep_that_cannot_be_composed_is_a_usage_error(tmp_path, tiny, bad):
    result = _metarun([bad, *tiny, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert bad.split("=")[0] in result.stderr


def test_exit_status_is_per_command_in_one_process(tmp_path, tiny, in_process):
    """A sweep whose job failed (status 1), then a command that cannot be composed (status 2)
    in the same process: the first sweep's jobs do not make the second look started."""
    sweep = f"hydra.sweep.dir={tmp_path / 'a'}"
    assert in_process(["algo.inner_steps=0", *tiny, sweep]) == 1
    assert in_process(["algo.inner_steps=x", *tiny, sweep]) == 2


def test_default_sweep_dir_holds_every_job_of_a_sweep_over_algorithms(tmp_path, tiny):
    """No hydra.sweep.dir given (the README's sweep command): the dir is named after the
    sweep's base config and every job lands in it, whatever algorithm the job runs."""
    result = _metarun(["algo=maml,fomaml", *tiny], tmp_path)
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert sweep.parent.name == "maml_sinusoid"
    assert [(r["job"], r["algo"], r["status"]) for r in _rows(sweep)] == [
        ("0", "maml", "done"),
        ("1", "fomaml", "done"),
    ]


def test_sigterm_stops_a_sweep_and_the_same_command_continues_it(tmp_path, tiny):
    """Basic launcher: SIGTERM (e.g. scancel of the allocation running the sweep) stops the job
    in training with a checkpoint and ends the sweep; the same command continues it."""
    sweep = tmp_path / "sweep"
    args = [*tiny, "log.every=1", "eval.every=0", "save.every=0", f"hydra.sweep.dir={sweep}"]
    process = subprocess.Popen(
        [METARUN, "-m", "seed=0,1", *args, "outer_steps=100000"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: _logged_steps(sweep / "0") >= 2, 120, process, "job 0 to train")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert [(r["job"], r["status"]) for r in _rows(sweep)] == [("0", "stopped")]
    assert not (sweep / "1").exists()
    step = load_checkpoint(sweep / "0" / "checkpoints" / "last.pt")["step"]

    again = _metarun(["seed=0,1", *args, f"outer_steps={step + 2}"], tmp_path)
    assert again.returncode == 0, again.stderr
    rows = _rows(sweep)
    assert [(r["status"], r["step"]) for r in rows] == [("done", str(step + 2))] * 2
    assert "resumed" in (sweep / "0" / "metarun.log").read_text()


def test_summary_command_errors(tmp_path):
    missing = subprocess.run([SUMMARY, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty = subprocess.run([SUMMARY, str(tmp_path)], capture_output=True, text=True)
    assert empty.returncode == 2 and "no jobs under" in empty.stderr


def _job(sweep: Path, name: str, overrides: list[str], *, results=None, status=None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
        if status is not None:  # results newer than the status file, whatever the mtime resolution
            stamp = (job / "status.json").stat().st_mtime + 1
            os.utime(job / "results.json", (stamp, stamp))
    return job


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_job_status_from_run_dirs(tmp_path):
    """Every status the table knows, from what jobs leave in their run dirs."""
    import socket

    host = socket.gethostname()
    done = {
        "step": 10,
        "best": {"metric": "val/accuracy", "value": 0.8, "step": 10},
        "test": {"metrics": {"accuracy": {"mean": 0.75, "ci95": 0.02, "n": 600}}},
    }
    running = {"status": "running", "pid": os.getpid(), "host": host}
    _job(tmp_path, "0", ["seed=0"], results=done, status=running | {"status": "done"})
    _job(tmp_path, "1", ["seed=1"], results={"step": 4, "stopped_by": "SIGTERM", "best": None})
    _job(tmp_path, "2", ["seed=2"], status={"status": "failed", "error": "ValueError: boom"})
    _job(tmp_path, "3", ["seed=3"], status=running)
    _job(tmp_path, "4", ["seed=4"], status=running | {"pid": _dead_pid()})
    # Requeued after a preemption signal: the process exited without reporting its end.
    requeued = {"step": 5, "stopped_by": "SIGUSR2", "best": None}
    _job(tmp_path, "5", ["seed=5"], status=running, results=requeued)
    _job(tmp_path, "6", ["+seed=6"])
    _job(tmp_path, "10", ["seed=10"], results=done)
    (tmp_path / ".submitit" / "1" / ".hydra").mkdir(parents=True)  # not a job

    rows = summary.summarize(tmp_path)
    assert [(r.job, r.status) for r in rows] == [
        ("0", "done"),
        ("1", "stopped"),
        ("2", "failed"),
        ("3", "running"),
        ("4", "killed"),
        ("5", "stopped"),
        ("6", "incomplete"),
        ("10", "done"),
    ]
    assert rows[0].metrics == {
        "step": 10,
        "val/best_accuracy": 0.8,
        "test/accuracy": 0.75,
        "test/accuracy_ci95": 0.02,
    }
    assert rows[1].note == "stopped by SIGTERM after step 4"
    assert rows[2].note == "ValueError: boom"
    assert rows[6].overrides == {"seed": "6"}
    markdown = summary.format_markdown(rows)
    assert "| 0 | done | 0 | 10 | 0.8 | 0.75 ± 0.02 |  |" in markdown
    assert "8 jobs: 2 done, 2 stopped, 1 failed, 1 running, 1 killed, 1 incomplete" in markdown


def test_objective_is_validation_error():
    assert objective({"best": {"metric": "val/loss", "value": 0.25}}) == 0.25
    assert objective({"best": {"metric": "val/accuracy", "value": 0.75}}) == 0.25
    assert math.isnan(objective({"best": None}))  # eval.every=0
    assert math.isnan(objective({"best": {"metric": "val/loss", "value": 1}, "stopped_by": "X"}))


def _swept(sweep: Path) -> dict[tuple[str, str], float]:
    """A finished sweep over inner_lr (3 values) x algo (2) x seed (2), written as jobs leave it;
    returns each job's test accuracy by (inner_lr, algo, seed) -> mean."""
    means = {}
    for i, (lr, algo, seed) in enumerate(
        (lr, algo, seed)
        for lr in ("0.01", "0.1", "1.0")
        for algo in ("maml", "fomaml")
        for seed in ("0", "1")
    ):
        mean = 0.5 + float(lr) / 4 + (0.05 if algo == "maml" else 0) + 0.01 * int(seed)
        means[(lr, algo, seed)] = mean
        accuracy = {"mean": mean, "ci95": 0.02, "n": 600}
        _job(
            sweep,
            str(i),
            [f"algo.inner_lr={lr}", f"algo={algo}", f"seed={seed}"],
            results={"step": 10, "test": {"metrics": {"accuracy": accuracy}}},
        )
    _job(sweep, "12", ["algo.inner_lr=9", "algo=maml", "seed=0"], status={"status": "failed"})
    return means


def test_summary_plots_the_swept_key_against_the_test_metric(tmp_path):
    means = _swept(tmp_path)
    x, metric, series = summary.sweep_points(summary.summarize(tmp_path))
    # The first swept key on the x axis, one line per algorithm, seeds averaged with their CI;
    # the failed job left out.
    assert (x, metric) == ("algo.inner_lr", "test/accuracy")
    assert sorted(series) == ["algo=fomaml", "algo=maml"]
    for label, points in series.items():
        algo = label.partition("=")[2]
        assert [p[0] for p in points] == [0.01, 0.1, 1.0]
        for lr, mean, ci in points:
            seeds = [means[(repr(lr), algo, s)] for s in ("0", "1")]
            assert mean == pytest.approx(sum(seeds) / 2)
            spread = math.sqrt(sum((m - mean) ** 2 for m in seeds))  # std over 2 seeds
            assert ci == pytest.approx(1.96 * spread / math.sqrt(2))
    # Seeds on the x axis: one point per job, with its own test CI.
    _, _, by_seed = summary.sweep_points(summary.summarize(tmp_path), x="seed")
    assert len(by_seed) == 6 and all(p[2] == 0.02 for points in by_seed.values() for p in points)

    out = tmp_path / "plots" / "sweep.png"
    assert summary.main([str(tmp_path), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.md").exists()


def test_summary_plot_errors_and_the_path_without_matplotlib(tmp_path, monkeypatch, capsys):
    _swept(tmp_path)
    assert summary.main([str(tmp_path), "--plot", str(tmp_path / "a.png"), "--x", "nope"]) == 2
    assert "'nope' is not an override" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    (tmp_path / "summary.md").unlink()
    assert summary.main([str(tmp_path), "--plot", str(tmp_path / "b.png")]) == 0
    err = capsys.readouterr().err
    assert "warning: matplotlib is not installed" in err and "metarun[plot]" in err
    assert not (tmp_path / "b.png").exists() and (tmp_path / "summary.md").exists()


def test_auto_resume_continues_only_the_same_experiment(make_config, tiny, tmp_path):
    args = [*tiny, "outer_steps=4"]
    api.run(make_config(args), tmp_path, overrides=args)
    more = [*tiny, "outer_steps=6"]  # outer_steps may change: the same experiment
    assert api.run(make_config(more), tmp_path, auto_resume=True).step == 6
    other = [*tiny, "outer_steps=8", "algo.inner_lr=0.5"]
    with pytest.raises(ConfigError, match=r"another experiment .*differs in: algo.inner_lr"):
        api.run(make_config(other), tmp_path, auto_resume=True)
    fresh = tmp_path / "fresh"  # nothing to continue: starts at step 0
    assert api.run(make_config(args), fresh, auto_resume=True).step == 4


# ------------------------------------------------------------------------------------- presets


@needs_submitit
def test_slurm_preset_composes_and_is_overridable(compose_cfg):
    cfg = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gres == "gpu:1"
    assert launcher.additional_parameters.requeue is True and launcher.max_num_timeout > 0
    local = compose_cfg(["hydra/launcher=local"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.timeout_min == 1440


@needs_optuna
def test_optuna_preset_composes(compose_cfg):
    sweeper = compose_cfg(["+search=optuna"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert "algo.inner_lr" in sweeper.params


# ----------------------------------------------------------------------------- Optuna, joblib


def _optuna_args(tmp_path: Path, tiny: list[str]) -> list[str]:
    return [
        "+search=optuna",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "hydra.sweeper.study_name=test",
        *tiny,
    ]


@needs_optuna
def test_optuna_search_with_sqlite_storage_continues_the_study(tmp_path, tiny, in_process):
    import optuna

    args = _optuna_args(tmp_path, tiny)
    assert in_process([*args, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}"]) == 0
    rows = _rows(tmp_path / "a")
    assert [r["status"] for r in rows] == ["done", "done"]
    assert len({r["algo.inner_lr"] for r in rows}) == 2  # sampled from the preset's space
    # The objective Optuna minimised is each job's best validation loss.
    best = yaml.safe_load((tmp_path / "a" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(float(r["val/best_loss"]) for r in rows))

    assert in_process([*args, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'b'}"]) == 0
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


@pytest.mark.slow
@needs_optuna
@needs_joblib
def test_joblib_launcher_runs_optuna_trials_in_parallel(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    result = _metarun(
        [
            *_optuna_args(tmp_path, tiny),
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",  # trials asked for and launched together
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    rows = _rows(sweep)
    assert [r["status"] for r in rows] == ["done", "done"]
    pids = {json.loads((sweep / r["job"] / "status.json").read_text())["pid"] for r in rows}
    assert len(pids) == 2  # two worker processes


# -------------------------------------------------------------------- submitit, preemption


def _wait_for(predicate, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"waiting for {what}: exit {process.returncode}\n{out}\n{err}")
        time.sleep(0.05)


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def _preempt_and_compare(sweep: Path, process: subprocess.Popen) -> None:
    """Job 1 gets submitit's preemption signal during training; it must be requeued, resume,
    and end exactly like job 0 (same config, uninterrupted)."""
    cut = sweep / "1"
    _wait_for(lambda: _logged_steps(cut) >= 3, 150, process, "job 1 to train")
    pid = json.loads((cut / "status.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)  # what SLURM sends (--signal=USR2@...) before preempting
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()  # no launcher left behind waiting for jobs
        logs = {p.name: p.read_text()[-2000:] for p in sweep.parent.glob("slurm_log/*.txt")}
        pytest.fail(f"the sweep did not end after the preemption; job logs: {logs}")
    assert process.returncode == 0, err

    log = (cut / "metarun.log").read_text()
    assert "SIGUSR2 received: stopping after this step and saving a checkpoint" in log
    assert "requeueing the job through submitit" in log
    assert "resumed" in log  # the requeued job continued from its checkpoint
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "done" and status["attempt"] == 2
    reference, resumed = (json.loads((sweep / j / "results.json").read_text()) for j in "01")
    assert resumed["step"] == reference["step"] == 400
    assert resumed["test"]["metrics"] == reference["test"]["metrics"]
    a, b = _params(sweep / "0"), _params(cut)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [r["status"] for r in _rows(sweep)] == ["done", "done"]


PREEMPTIBLE = [
    "name=reference,preempted",  # two jobs of the same experiment (name is not a parameter)
    "outer_steps=400",
    "meta_batch_size=2",
    "log.every=1",
    "eval.every=200",
    "eval.val_tasks=4",
    "eval.num_tasks=6",
    "eval.batch_size=3",
    "save.every=0",  # the only checkpoint is the one the signal makes
    "log.progress=false",
    "device=cpu",
    # Fixed: auto would time the candidates in each job and may pick differently (vmap and the
    # loop agree to ~1e-7, not bit for bit).
    "algo.task_batching=vmap",
]


@needs_submitit
def test_submitit_local_preemption_requeues_and_resumes_exactly(tmp_path):
    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [METARUN, "-m", "hydra/launcher=local", *PREEMPTIBLE, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _preempt_and_compare(sweep, process)


# A SLURM stand-in: sbatch starts each array task of the script in the background (SLURM's
# environment variables set), srun runs its command with the --output/--error files, scontrol
# requeue starts the task again once the calling job process has exited, sacct knows nothing.
FAKE_SLURM = {
    "sbatch": """
        import json, os, re, socket, subprocess, sys
        log = os.environ["FAKE_SLURM_LOG"]
        script = sys.argv[-1]
        text = open(script).read()
        with open(os.path.join(log, "sbatch.jsonl"), "a") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "script": text}) + "\\n")
        array = re.search(r"^#SBATCH --array=(\\d+)-(\\d+)", text, re.M)
        ntasks = re.search(r"^#SBATCH --ntasks-per-node=(\\d+)", text, re.M)
        for task in range(int(array[1]), int(array[2]) + 1) if array else [0]:
            with socket.socket() as s:  # a free rendezvous port for torch.distributed
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
            env = dict(os.environ, SLURM_JOB_ID=str(4242 + task),
                       SLURM_NTASKS=ntasks[1] if ntasks else "1", SLURM_JOB_NUM_NODES="1",
                       SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
                       SLURM_JOB_NODELIST="localhost", MASTER_PORT=port,
                       FAKE_SLURM_SCRIPT=script, FAKE_SLURM_TASK=str(task))
            if array:  # a single job (one sweep job) is not an array job
                env.update(SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(task))
            out = open(os.path.join(log, f"task{task}.txt"), "a")
            subprocess.Popen(["bash", script], env=env, start_new_session=True, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        print("Submitted batch job 4242")
    """,
    "srun": """
        import os, subprocess, sys, time
        args, paths = sys.argv[1:], {}
        while args[0].startswith("-"):
            flag = args.pop(0)
            if flag in ("--output", "--error"):
                path = args.pop(0)
                for k, v in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"),
                             ("%j", "SLURM_JOB_ID")):
                    path = path.replace(k, os.environ.get(v, ""))
                paths[flag] = path
        # submitit makes the job's log folder after sbatch returns; a real job starts later.
        deadline = time.time() + 120
        while not all(os.path.isdir(os.path.dirname(p)) for p in paths.values()):
            if time.time() > deadline:
                sys.exit(f"srun: no folder for {paths}")
            time.sleep(0.05)
        tasks = []
        for rank in range(int(os.environ["SLURM_NTASKS"])):  # one process per task, as SLURM
            files = {f: open(p.replace("%t", str(rank)), "a") for f, p in paths.items()}
            env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
            tasks.append(subprocess.Popen(args, env=env, stdout=files.get("--output"),
                                          stderr=files.get("--error")))
        sys.exit(max(t.wait() for t in tasks))
    """,
    "scontrol": """
        import json, os, subprocess, sys, time
        if sys.argv[1] == "requeue":
            with open(os.path.join(os.environ["FAKE_SLURM_LOG"], "scontrol.jsonl"), "a") as f:
                f.write(json.dumps(sys.argv[1:]) + "\\n")
            subprocess.Popen([sys.executable, __file__, "_restart", str(os.getppid())],
                             start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif sys.argv[1] == "_restart":
            while os.path.exists(f"/proc/{sys.argv[2]}"):
                time.sleep(0.1)
            env = dict(os.environ, SLURM_RESTART_COUNT="1")
            task = os.environ["FAKE_SLURM_TASK"]
            with open(os.path.join(os.environ["FAKE_SLURM_LOG"], f"task{task}.txt"), "a") as out:
                subprocess.call(["bash", os.environ["FAKE_SLURM_SCRIPT"]], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    """,
    "sacct": """
        print("JobID|State|NodeList")
    """,
}


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, str]:
    """PATH with fake sbatch/srun/scontrol/sacct; their calls are logged in FAKE_SLURM_LOG."""
    bin_dir, log = tmp_path / "fake_bin", tmp_path / "slurm_log"
    bin_dir.mkdir()
    log.mkdir()
    for name, code in FAKE_SLURM.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(code))
        path.chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(log))


@needs_submitit
def test_slurm_job_of_two_tasks_trains_as_one_distributed_run(tmp_path, fake_slurm, tiny):
    """hydra.launcher.tasks_per_node=2: one job, two SLURM tasks, joined by torch.distributed
    through submitit's environment; the same parameters as a single process, one writer."""
    sweep = tmp_path / "sweep"
    overrides = [*tiny, "meta_batch_size=4", "save.every=0", "eval.every=0"]
    result = _metarun(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.gres=null",
            *overrides,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        env=fake_slurm,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (call,) = [
        json.loads(line)
        for line in (tmp_path / "slurm_log" / "sbatch.jsonl").read_text().splitlines()
    ]
    assert "#SBATCH --ntasks-per-node=2" in call["script"].splitlines()
    assert [r["status"] for r in _rows(sweep)] == ["done"]
    log = (sweep / "0" / "metarun.log").read_text()
    assert "torch.distributed: rank 0 of 2" in log
    single = _metarun([*overrides, f"hydra.sweep.dir={tmp_path / 'single'}"], tmp_path)
    assert single.returncode == 0, single.stderr
    a, b = _params(tmp_path / "single" / "0"), _params(sweep / "0")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@needs_submitit
def test_slurm_preset_submits_sbatch_script_and_requeues_on_preemption(tmp_path, fake_slurm):
    sweep = tmp_path / "sweep"
    args = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debugq",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.gres=gpu:2",
        *PREEMPTIBLE,
        f"hydra.sweep.dir={sweep}",
    ]
    process = subprocess.Popen(
        [METARUN, "-m", *args],
        cwd=tmp_path,
        env=fake_slurm,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _preempt_and_compare(sweep, process)

    log = tmp_path / "slurm_log"
    (call,) = [json.loads(line) for line in (log / "sbatch.jsonl").read_text().splitlines()]
    script = call["script"]
    assert len(call["argv"]) == 1 and Path(call["argv"][0]).read_text() == script
    for line in (
        "#SBATCH --partition=debugq",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --time=30",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --array=0-1%2",  # 2 jobs at once (array_parallelism: 256)
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --job-name=metarun",
    ):
        assert line in script.splitlines()
    assert f"{sweep}/.submitit/%A_%a" in script and "srun --unbuffered --output" in script
    requeues = [json.loads(line) for line in (log / "scontrol.jsonl").read_text().splitlines()]
    assert requeues == [["requeue", "4242_1"]]
