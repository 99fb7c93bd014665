"""metarun.testing: the fake files of every ``dataset=`` option, written by ``write_fake_data``,
are found under ``METARUN_DATA`` and read by the real loaders into task sources."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metarun import registry
from metarun.config import RunConfig
from metarun.runner.build import build_tasks
from metarun.tasks import TaskBatch
from metarun.testing import write_fake_data

# Overrides that fit each option's sizes to the fake data (per_class=20), and an algorithm that
# fits the supervised options; the rest are defaults.
FITS: dict[str, list[str]] = {
    "omniglot": ["dataset.split=random"],
    # 25 classes: 4 in the validation split.
    "image_folder": ["dataset.n_way=3", "dataset.image_size=16"],
    "torchvision": ["dataset.n_way=3", "dataset.image_size=16"],
    "mnist_imbalance": [
        "algo=erm",
        "dataset.pos_ratio=0.9",
        "dataset.n_train=50",
        "dataset.n_val=4",
        "dataset.n_test=10",
        "dataset.batch_size=8",
    ],
    "cifar10_noisy": [
        "algo=erm",
        "dataset.n_clean=20",
        "dataset.batch_size=8",
        "dataset.clean_batch_size=5",
    ],
    "cifar100_noisy": [
        "algo=erm",
        "dataset.n_clean=100",
        "dataset.batch_size=8",
        "dataset.clean_batch_size=5",
    ],
    "cifar10_lt": [
        "algo=erm",
        "dataset.imbalance=10",
        "dataset.n_clean_per_class=2",
        "dataset.batch_size=8",
        "dataset.clean_batch_size=5",
    ],
    "cifar100_lt": [
        "algo=erm",
        "dataset.imbalance=10",
        "dataset.n_clean_per_class=2",
        "dataset.batch_size=8",
        "dataset.clean_batch_size=5",
    ],
    # Environment datasets (metarun/rl): goals, no files; the simulator is the algorithm's.
    "navigation2d": ["algo=maml_rl"],
    "halfcheetah_vel": ["algo=maml_rl"],
    "halfcheetah_dir": ["algo=maml_rl"],
}
CASES = [
    *([name] for name in registry.options("dataset")),
    ["omniglot", "dataset.n_way=20"],
    ["omniglot", "dataset.split=lake"],
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For the decoded-image caches, which default to ~/.cache/metarun; shared by the cases, so
    that the Omniglot ones decode the archives once."""
    return tmp_path_factory.mktemp("cache")


def test_the_layout_is_what_metarun_data_expects(data_root: Path) -> None:
    assert sorted(p.name for p in data_root.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-100-python",
        "images",
        "miniimagenet",
        "mnist",
        "omniglot",
        "tieredimagenet",
        "torchvision",
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda case: " ".join(case))
def test_every_dataset_option_builds_tasks_from_the_fake_files(
    case: list[str],
    data_root: Path,
    cache_home: Path,
    make_config: Callable[..., RunConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, *extra = case
    monkeypatch.setenv("METARUN_DATA", str(data_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    config = make_config([f"dataset={name}", *FITS.get(name, []), *extra])
    root = getattr(config.dataset, "root", None)
    assert root is None or Path(root).is_relative_to(data_root)  # found there, not elsewhere
    tasks = build_tasks(config.dataset)
    for source in (tasks.train, tasks.val, tasks.test):
        if not hasattr(source, "sample"):
            continue  # a fixed evaluation set, not a sampler
        batch = source.sample(2, torch.Generator().manual_seed(0))
        assert isinstance(batch, TaskBatch) and len(batch) == 2
        assert all(bool(t.isfinite().all()) for t in batch.tensors() if t.is_floating_point())
    if name == "omniglot":
        n_way = 20 if "dataset.n_way=20" in extra else 5
        assert batch.support_x.shape[1] == n_way  # one shot of each class
