"""The ``metarun`` command end to end (subprocesses), its error handling, and packaging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from helpers import METARUN, OMNIGLOT_40_STEPS, cli_env, omniglot_random, run_captured, run_metarun

from metarun import cli

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> Path:
    """One tiny CLI training run (from a folder that is not the checkout), shared below."""
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "run"
    result = run_metarun([*tiny, f"hydra.run.dir={run_dir}"], root)
    assert result.returncode == 0, result.stderr
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


def test_cli_trains_and_prints_a_summary(trained):
    stdout = (trained / "stdout.txt").read_text()
    assert "test loss:" in stdout and "± " in stdout
    assert f"tensorboard --logdir {trained / 'tb'}" in stdout
    results = json.loads((trained / "results.json").read_text())
    assert results["step"] == 6 and results["test"]["metrics"]["loss"]["n"] == 6
    assert (trained / "checkpoints" / "last.pt").is_file()
    assert (trained / ".hydra" / "config.yaml").is_file()  # Hydra's record of the run


def test_cli_eval_mode(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "last.pt"
    result = run_metarun(
        [
            "mode=eval",
            f"checkpoint={checkpoint}",
            "device=cpu",
            "eval.num_tasks=6",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "results.json").read_text())
    trained_results = json.loads((trained / "results.json").read_text())
    assert evaluated["mode"] == "eval"
    # Same weights, same test tasks.
    for name, stat in trained_results["test"]["metrics"].items():
        assert evaluated["test"]["metrics"][name]["mean"] == pytest.approx(stat["mean"], rel=1e-5)
    assert "test loss:" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["algo.inner_lrr=0.1"], ["algo.inner_lrr"]),
        (["algo.inner_lr=abc"], ["'abc'", "algo.inner_lr"]),
        (["algo=no_such_algo"], ["algo/no_such_algo", "fomaml"]),
        (
            ["algo.inner_steps=0"],
            ["error: algo.inner_steps must be >= 1, got 0 (set e.g. algo.inner_steps=5)"],
        ),
        (["device=gpu"], ["error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"]),
        (
            ["mode=eval", "checkpoint=/no/such.pt"],
            ["error: checkpoint '/no/such.pt' does not exist"],
        ),
    ],
)
def test_config_errors_exit_2_without_traceback(args, expected, tmp_path, monkeypatch, capsys):
    """In-process for speed: the same main() the console script runs."""
    monkeypatch.setattr(sys, "argv", ["metarun", *args, f"hydra.run.dir={tmp_path}"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(cli, "_started", False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err
    assert "Traceback" not in err


def test_config_error_in_a_real_process(tmp_path):
    for args, message in (
        (["dataset=omniglot", "dataset.n_way=1"], "error: dataset.n_way must be >= 2, got 1"),
        (["meta_optimizer.lr=fast"], "full_key: meta_optimizer.lr"),
    ):
        result = run_metarun([*args, f"hydra.run.dir={tmp_path}"], tmp_path)
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # Hydra's own hint after `algo.inner_lrr=0.1` fails; it used to run, ignoring the key.
        (
            "+algo.inner_lrr=0.1",
            "error: algo.inner_lrr=0.1: algo=maml has no key 'inner_lrr'; "
            "did you mean algo.inner_lr=0.1?",
        ),
        (
            "++eval.num_taskz=3",
            "error: eval.num_taskz=3: eval has no key 'num_taskz'; did you mean eval.num_tasks=3?",
        ),
        ("+algo.foo=1", "error: algo.foo=1: algo=maml has no key 'foo'; its keys: inner_lr,"),
    ],
)
def test_plus_prefixed_unknown_keys_fail_naming_the_nearest_key(override, expected, tmp_path):
    run_dir = tmp_path / "run"
    result = run_metarun([override, "outer_steps=1", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # failed before training: nothing left behind


def test_hydra_keys_and_group_appends_stay_free_form(tmp_path, tiny):
    """Keys no metarun schema declares, which Hydra itself takes: its own config (hydra.*,
    `+hydra.job.env_set.X`), its config groups (`hydra/job_logging=...`)."""
    run_dir = tmp_path / "run"
    result = run_metarun(
        [
            *tiny,
            "outer_steps=1",
            "+hydra.job.env_set.METARUN_TEST_VAR=1",
            "hydra/job_logging=disabled",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (run_dir / "results.json").is_file()


def test_a_run_that_fails_before_training_leaves_no_run_dir_and_logs_its_error(tmp_path):
    # Hydra's default run dir, outputs/<name>/<time>: removed with the folders made for it.
    result = run_metarun(["algo.inner_steps=0"], tmp_path)
    assert result.returncode == 2, result.stderr
    message = "error: algo.inner_steps must be >= 1, got 0 (set e.g. algo.inner_steps=5)"
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()
    # A run dir that was there before is the user's: it stays, and its log says why it failed.
    existing = tmp_path / "mine"
    existing.mkdir()
    result = run_metarun(["algo.inner_steps=0", f"hydra.run.dir={existing}"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in (existing / "metarun.log").read_text()
    assert result.stderr.count(message) == 1 and message not in result.stdout


def test_readme_download_command_runs_as_written_in_bash(tmp_path, tiny):
    """README: `metarun dataset=omniglot dataset.download=true dataset.root=...` pasted into
    bash. Its `~/data/omniglot` reached Hydra unexpanded and failed to parse. Here the archives
    are already in $HOME/data/omniglot (the minimal ones under the full archives' names), so
    download=true checks them and fetches nothing."""
    readme = (REPO / "README.md").read_text()
    (line,) = [
        line
        for line in readme.splitlines()
        if line.startswith("metarun dataset=omniglot dataset.download=true")
    ]
    command = line.split("#")[0].strip()
    home = tmp_path / "home"
    data = home / "data" / "omniglot"
    data.mkdir(parents=True)
    shared = Path(os.environ.get("METARUN_DATA", "/work/shared/data")) / "omniglot"
    if not (shared / "images_background_small1.zip").is_file():
        pytest.skip("Omniglot archives not under $METARUN_DATA/omniglot")
    (data / "images_background.zip").symlink_to(shared / "images_background_small1.zip")
    (data / "images_evaluation.zip").symlink_to(shared / "images_background_small2.zip")
    run_dir = tmp_path / "run"
    small = [
        *tiny,
        "outer_steps=1",
        "meta_batch_size=1",
        "eval.every=0",
        "eval.num_tasks=1",
        "eval.batch_size=1",
        "dataset.split=random",
        "algo.task_batching=loop",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**cli_env(), "HOME": str(home), "PATH": f"{Path(METARUN).parent}:{os.environ['PATH']}"}
    result = run_captured(["bash", "-c", f"{command} {' '.join(small)}"], tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert config["dataset"]["root"] == str(data)

    # A quoted ~/ reaches metarun as it is, which expands it (the message shows where it looked).
    missing = run_captured(
        ["bash", "-c", """metarun dataset=omniglot 'dataset.root="~/nowhere"' outer_steps=1"""],
        tmp_path,
        env=env,
    )
    assert missing.returncode == 2, missing.stderr
    assert f"Omniglot not found for dataset.root='{home / 'nowhere'}'" in missing.stderr


def test_sigterm_checkpoints_and_resume_continues(tmp_path, tiny):
    run_dir = tmp_path / "run"
    args = [
        *tiny,
        "outer_steps=100000",
        "log.every=1",
        "eval.every=0",
        "save.every=0",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        [METARUN, *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr  # preemption is not a failure
    assert "stopped by SIGTERM" in stdout and "resume with: metarun" in stdout
    assert "resume=true" in stdout and f"hydra.run.dir={run_dir}" in stdout

    from metarun.runner.checkpoint import load_checkpoint

    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert step >= 2
    resumed = run_metarun([*args, f"outer_steps={step + 2}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "results.json").read_text())["step"] == step + 2


def test_unroll_and_algorithms_do_not_import_hydra():
    code = (
        "import sys, metarun, metarun.unroll, metarun.algorithms.maml; "
        "assert 'hydra' not in sys.modules and 'omegaconf' not in sys.modules, 'hydra'; "
        "assert callable(metarun.load)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_wheel_package_list_covers_every_package():
    """pyproject lists packages explicitly (conf/ ships as metarun.conf): none may be missing."""
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "metarun").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"metarun.conf"} == listed


@pytest.mark.slow
def test_installed_wheel_finds_its_configs(tmp_path, tiny):
    """Build the wheel, install it into a fresh venv, run from elsewhere: configs ship inside."""
    # Build from a copy: building in the checkout would write build/ and *.egg-info there.
    source = tmp_path / "source"
    for name in ("metarun", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
        else:
            (source / name).write_text("")
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("metarun-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [venv / "bin" / "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # torch, hydra, ... come from the project's environment.
    site = next(Path(sys.prefix).glob("lib/python*/site-packages"))
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    metarun = str(venv / "bin" / "metarun")
    shown = run_captured([metarun, "--cfg", "job", "experiment=omniglot_5way_1shot"], work, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "inner_lr: 0.4" in shown.stdout
    where = run_captured(
        [venv / "bin" / "python", "-c", "import metarun.cli as c; print(c.config_dir())"],
        work,
        env=env,
    )
    assert str(venv) in where.stdout, where.stderr
    result = run_captured([metarun, *tiny, "outer_steps=2"], work, env=env)
    assert result.returncode == 0, result.stderr
    assert list(work.glob("outputs/maml_sinusoid/*/results.json"))


OMNIGLOT_DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data"))


@pytest.mark.slow
@pytest.mark.skipif(
    not list((OMNIGLOT_DATA / "omniglot").glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_omniglot_short_run_beats_chance(tmp_path):
    """Real data: 40 meta-steps of 5-way 1-shot MAML on the characters present (split=random)."""
    env = cli_env(METARUN_DATA=str(OMNIGLOT_DATA))
    run_dir = tmp_path / "run"
    args = [
        *omniglot_random(tmp_path),
        *OMNIGLOT_40_STEPS,
        f"hydra.run.dir={run_dir}",
    ]
    result = run_metarun(args, tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "results.json").read_text())["test"]["metrics"]
    chance = 1 / 5
    assert metrics["accuracy"]["mean"] - metrics["accuracy"]["ci95"] > chance + 0.1
    assert metrics["accuracy"]["mean"] > metrics["pre_accuracy"]["mean"] + 0.1
    assert "test accuracy:" in result.stdout


def test_version_is_the_package_version(tmp_path):
    from metarun import __version__

    result = run_metarun(["--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"metarun {__version__}"
