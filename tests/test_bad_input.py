"""User mistakes, tried as a new user would make them: each exits with status 2 and an ``error:``
(or Hydra's one-line message) naming the key or file, never a traceback.

In-process (``cli.main()``, as the console script runs it) for speed; a few in real processes.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_metarun

from metarun import cli
from metarun.runner import api

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data"))
MNIST_TEST = DATA / "mnist" / "raw" / "t10k-images-idx3-ubyte.gz"
OMNIGLOT_ZIP = DATA / "omniglot" / "images_background_small1.zip"
# Enough for a run that gets past validation to end in a second: the cases below must fail
# before that, but a regression should not train for minutes.
QUICK = ["outer_steps=1", "eval.num_tasks=2", "eval.batch_size=1", "log.progress=false"]


def _main(args: list[str], monkeypatch, capsys) -> tuple[int | str | None, str]:
    monkeypatch.setattr(sys, "argv", ["metarun", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


def _assert_usage_error(args, expected, tmp_path, monkeypatch, capsys) -> str:
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        args = [*args, f"hydra.run.dir={tmp_path / 'run'}"]
    flags = [a for a in args if a.startswith("-")]  # e.g. -m, before any override
    overrides = [a for a in args if not a.startswith("-")]
    code, err = _main([*flags, *QUICK, *overrides], monkeypatch, capsys)
    assert "Traceback" not in err, err
    assert code == 2, err
    for part in expected:
        assert part in err, err
    return err


# ------------------------------------------------------------------------- config (compose time)

COMPOSE_CASES = [
    # (args, parts of the message)
    (["algo.inner_lrr=0.1"], ["algo.inner_lrr"]),
    (["algo=mamll"], ["algo/mamll", "maml"]),
    (["dataset=imagenet"], ["dataset/imagenet", "omniglot"]),
    (["model=vit"], ["model/vit", "conv4"]),
    (["experiment=nope"], ["experiment/nope"]),
    (["mode=predict"], ["mode", "predict"]),
    (["algo.learn_inner_lr=sometimes"], ["algo.learn_inner_lr", "sometimes"]),
    (["algo.bn_policy=moving"], ["algo.bn_policy", "moving"]),
    (["algo.task_batching=threads"], ["algo.task_batching", "threads"]),
    (["meta_optimizer.name=rmsprop"], ["meta_optimizer.name", "rmsprop"]),
    (["meta_optimizer.schedule=linear"], ["meta_optimizer.schedule", "linear"]),
    (["dataset=omniglot", "dataset.split=mine"], ["dataset.split", "mine"]),
    (
        ["algo=l2rw", "dataset=mnist_imbalance", "dataset.source_split=val"],
        ["dataset.source_split", "val"],
    ),
    (["algo=erm", "dataset=cifar10_noisy", "dataset.noise_type=pairs"], ["dataset.noise_type"]),
    (["algo=l2rw", "dataset=mnist_imbalance", "model.variant=lenet6"], ["model.variant"]),
    (["algo.inner_lr=abc"], ["'abc'", "algo.inner_lr"]),
    (["seed=abc"], ["seed", "abc"]),
    (["outer_steps=1.5"], ["outer_steps"]),
    (["log.every=often"], ["log.every"]),
    (["resume=maybe"], ["resume"]),
    (["algo.inner_steps=1,x"], ["algo.inner_steps"]),  # a sweep value without -m
]


@pytest.mark.parametrize(("args", "expected"), COMPOSE_CASES)
def test_compose_errors(args, expected, tmp_path, monkeypatch, capsys):
    _assert_usage_error(args, expected, tmp_path, monkeypatch, capsys)


# ------------------------------------------------------------------------- config (validation)

VALUE_CASES = [
    (["outer_steps=-1"], "error: outer_steps must be >= 1, got -1"),
    (["meta_batch_size=0"], "error: meta_batch_size must be >= 1, got 0"),
    (["algo.inner_steps=-2"], "error: algo.inner_steps must be >= 1, got -2"),
    (["algo.eval_inner_steps=-1"], "error: algo.eval_inner_steps must be >= 0"),
    (["algo.inner_lr=-0.1"], "error: algo.inner_lr must be > 0"),
    (["algo.task_chunk_size=0"], "error: algo.task_chunk_size must be >= 1"),
    (["algo.memory_budget_mb=-5"], "error: algo.memory_budget_mb must be > 0"),
    (["meta_optimizer.lr=0"], "error: meta_optimizer.lr must be > 0"),
    (["meta_optimizer.momentum=-1"], "error: meta_optimizer.momentum must be >= 0"),
    (["meta_optimizer.weight_decay=-1"], "error: meta_optimizer.weight_decay must be >= 0"),
    (["meta_optimizer.milestones=[5,3]"], "error: meta_optimizer.milestones must be"),
    (["meta_optimizer.schedule=step"], "meta_optimizer.milestones must be non-empty"),
    (["meta_optimizer.gamma=0"], "error: meta_optimizer.gamma must be > 0"),
    (["eval.num_tasks=0"], "error: eval.num_tasks must be >= 1"),
    (["eval.val_tasks=0"], "error: eval.val_tasks must be >= 1"),
    (["eval.batch_size=-1"], "error: eval.batch_size must be >= 1"),
    (["eval.every=-1"], "error: eval.every must be >= 0"),
    (["eval.inner_steps=-1"], "error: eval.inner_steps must be >= 0 or null"),
    (["eval.curve_steps=[-1]"], "error: eval.curve_steps must be"),
    (["log.every=0"], "error: log.every must be >= 1"),
    (["save.every=-5"], "error: save.every must be >= 0"),
    (["prefetch=-1"], "error: prefetch must be >= 0"),
    (["grad_clip=-1"], "error: grad_clip must be > 0 or null"),
    (["max_nonfinite_steps=-1"], "error: max_nonfinite_steps must be >= 0"),
    (["dataset.k_shot=0"], "error: dataset.k_shot must be >= 1"),
    (["dataset.k_query=0"], "error: dataset.k_query must be >= 1"),
    (["model.hidden=[0]"], "error: model.hidden must be"),
    (["dataset=omniglot", "dataset.n_way=1"], "error: dataset.n_way must be >= 2, got 1"),
    (["dataset=omniglot", "dataset.image_size=0"], "error: dataset.image_size must be"),
    (["dataset=omniglot", "dataset.fractions=[0.5]"], "error: dataset.fractions must be"),
    (["dataset=omniglot", "model.hidden=0"], "error: model.hidden must be"),
    (["algo=l2rw", "dataset=mnist_imbalance", "dataset.n_train=0"], "dataset.n_train"),
    (["algo=l2rw", "dataset=mnist_imbalance", "algo.lookahead_lr=-1"], "algo.lookahead_lr"),
    (["algo=erm", "dataset=cifar10_noisy", "dataset.noise=1.5"], "error: dataset.noise must be"),
    (["device=gpu"], "error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["device=cuda:x"], "error: device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["device=tpu:0"], "error: device must be auto, cpu, cuda or cuda:N"),
    (["mode=eval"], "error: checkpoint must be set with mode=eval"),
    (["checkpoint=x.pt"], "error: checkpoint is only read with mode=eval"),
    # Options that do not fit together, in both directions.
    (["algo=l2rw", "dataset=omniglot"], "error: algo=l2rw does not fit dataset=omniglot"),
    (["algo=erm", "dataset=omniglot"], "error: algo=erm does not fit dataset=omniglot"),
    (["algo=maml", "dataset=mnist_imbalance"], "algo=maml does not fit dataset=mnist_imbalance"),
    (["algo=fomaml", "dataset=cifar10_noisy"], "algo=fomaml does not fit dataset=cifar10_noisy"),
    (["algo=l2rw"], "error: algo=l2rw does not fit dataset=sinusoid"),
    (["model=conv4"], "error: model=conv4 does not fit dataset=sinusoid"),
    (["dataset=omniglot", "model=mlp"], "error: model=mlp does not fit dataset=omniglot"),
    (["algo=l2rw", "dataset=mnist_imbalance", "meta_batch_size=4"], "meta_batch_size must be 1"),
    # Keys added with Hydra's + or ++ (its own hint for an unknown key): every schema refuses
    # them, naming the nearest key.
    (
        ["+algo.inner_lrr=0.1"],
        "error: algo.inner_lrr=0.1: algo=maml has no key 'inner_lrr'; did you mean "
        "algo.inner_lr=0.1?",
    ),
    (["++algo.inner_lrr=0.1"], "did you mean algo.inner_lr=0.1?"),
    (["+algo.foo=1"], "error: algo.foo=1: algo=maml has no key 'foo'; its keys: inner_lr,"),
    (["+dataset.n_way=20"], "error: dataset.n_way=20: dataset=sinusoid has no key 'n_way'"),
    (["dataset=omniglot", "+dataset.n_wayy=20"], "did you mean dataset.n_way=20?"),
    (["+model.hiden=[8]"], "error: model.hiden=[8]: model=mlp has no key 'hiden'; did you mean"),
    (["+eval.num_taskz=3"], "error: eval.num_taskz=3: eval has no key 'num_taskz'; did you mean"),
    (["+meta_optimizer.lrr=0.1"], "did you mean meta_optimizer.lr=0.1?"),
    (["+seeds=1"], "error: seeds=1: the run config has no key 'seeds'; did you mean seed=1?"),
    (["algo=protonets", "dataset=omniglot", "++algo.inner_lr=0.1"], "algo=protonets has no key"),
]


@pytest.mark.parametrize(("args", "expected"), VALUE_CASES)
def test_value_errors(args, expected, tmp_path, monkeypatch, capsys):
    _assert_usage_error(args, [expected], tmp_path, monkeypatch, capsys)


def test_a_cuda_device_that_is_not_there(tmp_path, monkeypatch, capsys):
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last (or any, without CUDA)
    _assert_usage_error([f"device={device}"], ["device", device], tmp_path, monkeypatch, capsys)


# ---------------------------------------------------------------------------------- data on disk


@pytest.fixture
def bad_data(tmp_path) -> Path:
    """Folders holding the kinds of broken files a download or a copy leaves behind."""
    root = tmp_path / "data"
    for name, content in (
        ("omni_empty", b""),
        ("omni_text", b"<html>404 Not Found</html>"),
    ):
        (root / name).mkdir(parents=True)
        (root / name / "images_background.zip").write_bytes(content)
    (root / "omni_truncated").mkdir()
    if OMNIGLOT_ZIP.is_file():
        head = OMNIGLOT_ZIP.read_bytes()[: OMNIGLOT_ZIP.stat().st_size // 2]
        (root / "omni_truncated" / "images_background_small1.zip").write_bytes(head)
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    raw = root / "mnist_truncated" / "raw"
    raw.mkdir(parents=True)
    if MNIST_TEST.is_file():
        (raw / MNIST_TEST.name).write_bytes(MNIST_TEST.read_bytes()[:5000])
        labels = MNIST_TEST.with_name("t10k-labels-idx1-ubyte.gz")
        shutil.copy(labels, raw / labels.name)
    (raw.parent / "raw_gz").mkdir()
    batches = root / "cifar_garbage" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4"):
        (batches / name).write_bytes(b"garbage")
    for name in ("data_batch_5", "test_batch"):
        (batches / name).write_bytes(gzip.compress(b"also garbage"))
    return root


OMNIGLOT = ["dataset=omniglot", "device=cpu"]
MNIST = ["algo=l2rw", "dataset=mnist_imbalance", "dataset.source_split=test", "device=cpu"]
DATA_CASES = [
    # (args with {root}, parts of the message with {root})
    (
        [*OMNIGLOT, "dataset.root={root}/omni_empty"],
        ["{root}/omni_empty/images_background.zip", "dataset.download=true", "delete it"],
    ),
    (
        [*OMNIGLOT, "dataset.root={root}/omni_text"],
        ["{root}/omni_text/images_background.zip", "not a zip file"],
    ),
    (
        [*OMNIGLOT, "dataset.root={root}/omni_truncated"],
        ["{root}/omni_truncated/images_background_small1.zip", "truncated"],
    ),
    ([*OMNIGLOT, "dataset.root={root}/empty"], ["Omniglot not found", "dataset.root"]),
    ([*OMNIGLOT, "dataset.root={root}/a_file"], ["Omniglot not found", "{root}/a_file"]),
    (
        [*MNIST, "dataset.root={root}/mnist_truncated", "dataset.n_train=758"],
        ["{root}/mnist_truncated/raw/t10k-images-idx3-ubyte.gz", "corrupt or truncated"],
    ),
    ([*MNIST, "dataset.root={root}/empty"], ["MNIST test split not found", "dataset.root"]),
    ([*MNIST, "dataset.root={root}/a_file"], ["MNIST test split not found", "{root}/a_file"]),
    (
        ["algo=erm", "dataset=cifar10_noisy", "dataset.root={root}/cifar_garbage", "device=cpu"],
        ["{root}/cifar_garbage/cifar-10-batches-py/data_batch_1", "dataset.download=true"],
    ),
    (
        ["algo=erm", "dataset=cifar100_noisy", "dataset.root={root}/empty", "device=cpu"],
        ["CIFAR-100 not found", "dataset.root"],
    ),
]


@pytest.mark.parametrize(("args", "expected"), DATA_CASES)
def test_data_errors(args, expected, bad_data, tmp_path, monkeypatch, capsys):
    if "truncated" in " ".join(args) and not (OMNIGLOT_ZIP.is_file() and MNIST_TEST.is_file()):
        pytest.skip("needs the shared Omniglot and MNIST files under $METARUN_DATA")
    root = str(bad_data)
    args = [a.replace("{root}", root) for a in args]
    expected = [e.replace("{root}", root) for e in expected]
    # The decoded-image cache must not hide a broken archive, nor be written outside tmp_path.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _assert_usage_error(args, expected, tmp_path, monkeypatch, capsys)


# ----------------------------------------------------------------------- download, no network

OFFLINE_CASES = [
    # (args, the first file fetched, its URL)
    (
        OMNIGLOT,
        "images_background.zip",
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
        "images_background.zip",
    ),
    (
        MNIST,
        "t10k-images-idx3-ubyte.gz",
        "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
    ),
    (
        ["algo=erm", "dataset=cifar10_noisy", "device=cpu"],
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    (
        ["algo=erm", "dataset=cifar100_noisy", "device=cpu"],
        "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
]


@pytest.mark.parametrize(("args", "filename", "url"), OFFLINE_CASES)
def test_download_without_network(args, filename, url, tmp_path, monkeypatch, capsys):
    """dataset.download=true on a machine without network: a usage error naming the file, the
    URL and the fix, at once (no traceback, no hang, nothing left behind)."""
    looked_up: list[str] = []

    def no_network(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    err = _assert_usage_error(
        [*args, f"dataset.root={root}", "dataset.download=true"],
        ["error: could not download", filename, url, "name resolution", "dataset.download=true"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "yourself" in err and str(root) in err  # where to put the file by hand
    assert looked_up  # the network was tried, through the socket layer
    assert not [p for p in root.rglob("*") if p.is_file()]  # no partial download


# ---------------------------------------------------------------------------------- run dirs


def test_run_dir_under_proc(tmp_path, monkeypatch, capsys):
    _assert_usage_error(
        ["hydra.run.dir=/proc/metarun/run"],
        ["error: hydra.run.dir='/proc/metarun/run' cannot be used", "hydra.run.dir="],
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_run_dir_below_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "a_file" / "run"
    _assert_usage_error(
        [f"hydra.run.dir={run_dir}"],
        [f"error: hydra.run.dir='{run_dir}' cannot be used", "Not a directory"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert (tmp_path / "a_file").is_file()


def test_sweep_dir_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    _assert_usage_error(
        ["-m", "seed=0,1", "hydra.sweep.dir=/proc/metarun/sweep"],
        ["error: hydra.sweep.dir='/proc/metarun/sweep' cannot be used"],
        tmp_path,
        monkeypatch,
        capsys,
    )


# --------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> Path:
    """A tiny sinusoid run (in-process, as the CLI runs it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metarun.config import validate
    from metarun.config.store import register_configs

    run_dir = tmp_path_factory.mktemp("trained")
    register_configs()
    with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(tiny), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        api.run(validate(cfg), run_dir)
    return run_dir


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)
    return run_dir


def test_eval_checkpoint_is_a_folder(trained, tmp_path, monkeypatch, capsys):
    _assert_usage_error(
        ["mode=eval", f"checkpoint={trained}"],
        [f"error: checkpoint: '{trained}' is a folder", f"{trained}/checkpoints/last.pt"],
        tmp_path,
        monkeypatch,
        capsys,
    )


@pytest.mark.parametrize(
    "content", [b"", b"hello", b"PK\x03\x04 half a zip"], ids=["empty", "text", "zip-ish"]
)
def test_eval_checkpoint_that_is_not_one(content, tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    _assert_usage_error(
        ["mode=eval", f"checkpoint={path}"],
        [f"error: checkpoint: '{path}' is not a metarun checkpoint"],
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_eval_truncated_checkpoint(trained, tmp_path, monkeypatch, capsys):
    path = tmp_path / "last.pt"
    data = (trained / "checkpoints" / "last.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_usage_error(
        ["mode=eval", f"checkpoint={path}"],
        [f"'{path}' is not a metarun checkpoint"],
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_eval_plain_torch_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    _assert_usage_error(
        ["mode=eval", f"checkpoint={path}"],
        [f"'{path}' is not a metarun checkpoint", "lacks"],
        tmp_path,
        monkeypatch,
        capsys,
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algo=fomaml", "algo=fomaml differs from the checkpoint's algo=maml"),
        ("dataset=omniglot", "dataset=omniglot differs from the checkpoint's dataset=sinusoid"),
    ],
)
def test_eval_with_another_option(trained, override, expected, tmp_path, monkeypatch, capsys):
    checkpoint = trained / "checkpoints" / "last.pt"
    _assert_usage_error(
        ["mode=eval", f"checkpoint={checkpoint}", override],
        [f"error: {expected}"],
        tmp_path,
        monkeypatch,
        capsys,
    )


@pytest.fixture(scope="module")
def omniglot_maml(tmp_path_factory) -> Path:
    """A checkpoint of MAML on Omniglot 5-way (untrained weights: these cases fail before any
    data is read), trained for QUICK's one outer step as far as its config says."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metarun.config import options, to_yaml, validate
    from metarun.config.store import register_configs
    from metarun.runner.build import build_experiment

    register_configs()
    with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=omniglot", *QUICK], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        config = validate(cfg)
    experiment = build_experiment(config, with_data=False, device=torch.device("cpu"))
    path = tmp_path_factory.mktemp("omniglot_maml") / "best.pt"
    state = {"algorithm": experiment.algorithm.state_dict(), "step": 1}
    torch.save({**state, "config": to_yaml(config), "options": options(config)}, path)
    return path


EVAL_CASES = [
    # mode=eval composes against the checkpoint's own schemas (Omniglot here, not the default
    # sinusoid), and refuses what would test something other than what was trained.
    (
        ["dataset.n_way=20"],
        [
            "error: dataset.n_way: this checkpoint cannot be tested with dataset.n_way=20",
            "dataset.eval_n_way must equal dataset.n_way (5) for algo=maml",
        ],
    ),
    (["+dataset.n_way=20"], ["An item is already at 'dataset.n_way'", "dataset.n_way=20"]),
    (
        ["algo.inner_lr=0.1"],
        [
            "error: algo.inner_lr: mode=eval tests the checkpoint as it was trained",
            "the checkpoint has algo.inner_lr=0.4, got 0.1",
            "algo.eval_inner_steps",
        ],
    ),
    (["model.hidden=32"], ["error: model.hidden:", "model.hidden=64, got 32", "architecture"]),
    (["dataset.split=lake"], ["error: dataset.split:", "dataset.split=finn, got lake"]),
    (["meta_batch_size=4"], ["error: meta_batch_size:", "a training setting"]),
    (["+algo.foo=1"], ["error: algo.foo=1: algo=maml has no key 'foo'"]),
    (["+dataset.n_wayy=20"], ["error: dataset.n_wayy=20: dataset=omniglot has no key"]),
    (["experiment=omniglot_20way_1shot"], ["error: experiment=omniglot_20way_1shot: mode=eval"]),
    (["dataset=sinusoid"], ["error: dataset=sinusoid differs from the checkpoint's dataset"]),
]


@pytest.mark.parametrize(("args", "expected"), EVAL_CASES)
def test_eval_overrides(omniglot_maml, args, expected, tmp_path, monkeypatch, capsys):
    _assert_usage_error(
        ["mode=eval", f"checkpoint={omniglot_maml}", *args], expected, tmp_path, monkeypatch, capsys
    )
    assert not (tmp_path / "run").exists()


def test_train_into_a_finished_run_without_resume(trained, tmp_path, monkeypatch, capsys):
    run_dir = _copy_run(trained, tmp_path)
    _assert_usage_error(
        [f"hydra.run.dir={run_dir}"],
        ["error: resume must be true to continue the run in", "resume=true"],
        tmp_path,
        monkeypatch,
        capsys,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["algo=fomaml"], ["is another experiment", "algo=maml", "algo=fomaml"]),
        (["model.hidden=[8]"], ["does not fit this config", "model.hidden"]),
    ],
    ids=["another-algo", "another-model-size"],
)
def test_resume_another_experiment(trained, args, expected, tmp_path, monkeypatch, capsys):
    run_dir = _copy_run(trained, tmp_path)
    err = _assert_usage_error(
        [*args, "resume=true", "outer_steps=8", f"hydra.run.dir={run_dir}"],
        ["error: resume:", str(run_dir), *expected],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "RuntimeError" not in err.split("does not fit")[0]


# ------------------------------------------------------------------------------ real processes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["algo=l2rw", "dataset=omniglot"], "error: algo=l2rw does not fit dataset=omniglot"),
        (["hydra.run.dir=/proc/metarun"], "error: hydra.run.dir='/proc/metarun' cannot be used"),
        (["mode=eval", "checkpoint=/"], "error: checkpoint: '/' is a folder"),
    ],
)
def test_in_a_real_process(args, expected, tmp_path):
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_metarun([*QUICK, *args], tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
