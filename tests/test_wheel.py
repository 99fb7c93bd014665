"""The sdist and the wheel work outside the checkout: `python -m build` makes both (the wheel from
the sdist, as a release does), the wheel installs into a bare folder, and metarun runs from
there with no checkout on sys.path. A config file missing from the package data, or a run-time
need of something outside the package (docs/, tests/, the checkout's conf/), fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.wheel, pytest.mark.slow]


def _env(site: Path, home: Path) -> dict[str, str]:
    # torch, hydra, ... still come from this environment's site-packages, which also holds the
    # editable install's finder; PYTHONPATH puts the wheel's copy ahead of it (checked below).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METARUN_", "PYTHON"))}
    env.update(PYTHONPATH=str(site), HOME=str(home), NO_COLOR="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: building in the checkout would write build/ and *.egg-info there while
    # other test runs may be reading them.
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("metarun", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp / "dist"
    # No isolation: the build backend comes from this environment instead of the network.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = list(dist.glob("metarun-*-py3-none-any.whl"))
    sdists = list(dist.glob("metarun-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    site = tmp / "site"
    options = "--no-deps --no-index --no-compile --disable-pip-version-check -q".split()
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", *options, "--target", str(site), str(wheels[0])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return {"wheel": wheels[0], "site": site, "work": work, "home": tmp}


def _run(installed: dict[str, Path], *args: str | Path, timeout: float = 180) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=installed["work"],
        env=_env(installed["site"], installed["home"]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_wheel_holds_every_config_and_nothing_of_the_checkout(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    configs = {
        "metarun/conf/" + p.relative_to(REPO / "conf").as_posix()
        for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs <= names, sorted(configs - names)
    assert "metarun/py.typed" in names
    assert not [n for n in names if n.startswith(("docs/", "tests/", "scripts/", "conf/"))]


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    code = (
        "import importlib.metadata as md, metarun, metarun.cli, metarun.unroll as higher; "
        "print(metarun.__file__); print(metarun.cli.config_dir()); "
        "print(md.version('metarun'), metarun.__version__); print(higher.innerloop_ctx.__name__)"
    )
    file, conf, versions, ctx = _run(installed, sys.executable, "-c", code).split("\n")[:4]
    site = str(installed["site"].resolve())
    assert file.startswith(site), file
    assert conf == str(installed["site"].resolve() / "metarun" / "conf"), conf
    dist_version, package_version = versions.split()
    assert dist_version == package_version  # the version has one source: metarun.__version__
    assert ctx == "innerloop_ctx"


def test_installed_cli_helps_composes_and_trains(installed):
    shown = _run(installed, sys.executable, "-m", "metarun.cli", "--help")
    assert "experiment" in shown and "omniglot_5way_1shot" in shown
    # The console script pip wrote, on a paper preset: every file the preset composes ships.
    script = installed["site"] / "bin" / "metarun"
    job = _run(installed, script, "experiment=omniglot_5way_1shot", "--cfg", "job")
    assert "inner_lr: 0.4" in job and "n_way: 5" in job
    tiny = "outer_steps=2 meta_batch_size=2 eval.every=0 eval.num_tasks=2 log.progress=false"
    _run(installed, sys.executable, "-m", "metarun.cli", *tiny.split(), "device=cpu")
    results = list(installed["work"].glob("outputs/maml_sinusoid/*/results.json"))
    assert len(results) == 1, list(installed["work"].rglob("*"))
