"""Shared helpers: compose a config from ``conf/`` as the CLI does, tiny run settings."""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metarun.cli import config_dir
from metarun.config import RunConfig, validate
from metarun.config.store import register_configs
from metarun.runner import api
from metarun.runner.api import RunSummary


@pytest.fixture(autouse=True)
def _seed_from_test_name(request: pytest.FixtureRequest) -> None:
    """Every test starts from RNG states fixed by its own name, so a failure seen once (in CI,
    or in a run of the whole suite) happens again when that test runs alone, whatever ran
    before it."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


# A sinusoid run that takes a second or two on a laptop CPU.
TINY = [
    "outer_steps=6",
    "meta_batch_size=2",
    "log.every=2",
    "eval.every=3",
    "eval.val_tasks=4",
    "eval.num_tasks=6",
    "eval.batch_size=3",
    "save.every=3",
    "log.progress=false",
    "device=cpu",
    # The test figures cost ~0.3 s of matplotlib per run; tests/test_figures.py checks them.
    "eval.figures=false",
]

Compose = Callable[..., DictConfig]


@pytest.fixture(scope="session")
def tiny() -> list[str]:
    """Overrides for a sinusoid run of a second or two."""
    return list(TINY)


@pytest.fixture
def compose_cfg() -> Iterator[Compose]:
    """``compose_cfg(overrides)`` -> the composed DictConfig, with Hydra's runtime config set so
    that ``${hydra:...}`` interpolations resolve, as under the CLI."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):

        def _compose(overrides: Sequence[str] = ()) -> DictConfig:
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            return cfg

        yield _compose


@pytest.fixture
def make_config(compose_cfg: Compose) -> Callable[..., RunConfig]:
    """``make_config(overrides)`` -> validated :class:`RunConfig`."""

    def _make(overrides: Sequence[str] = ()) -> RunConfig:
        return validate(compose_cfg(overrides))

    return _make


Train = Callable[..., RunSummary]


@pytest.fixture
def train_with(make_config: Callable[..., RunConfig], tiny: list[str]) -> Callable[..., Train]:
    """``train_with(settings)`` -> ``train(run_dir, overrides)``: a tiny run (``tiny``, then
    ``settings``, then ``overrides``) as the CLI does it. A test file that adds its own settings
    to every run overrides ``train`` with ``train_with(ITS_SETTINGS)``."""

    def _with(settings: Sequence[str]) -> Train:
        def _train(run_dir: Path, overrides: Sequence[str] = ()) -> RunSummary:
            args = [*tiny, *settings, *overrides]
            return api.run(make_config(args), run_dir, overrides=args)

        return _train

    return _with


@pytest.fixture
def train(train_with: Callable[..., Train]) -> Train:
    """``train(run_dir, overrides)``: a tiny run (``tiny`` plus ``overrides``) as the CLI does
    it."""
    return train_with(())


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 as torch's default dtype for the test: torch.optim keeps scalar state (step,
    NAdam's mu_product, ASGD's eta) in the default dtype, and float64 comparisons need it float64
    too, or torch's own float32 rounding dominates the error."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def mnist_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with generated official-format MNIST test files (40 fours, 60 nines and 5
    ones), which ``helpers.MNIST_IMBALANCE`` reads."""
    from metarun.testing import write_mnist

    root = tmp_path_factory.mktemp("data")
    write_mnist(root / "mnist" / "raw", "t10k", {4: 40, 9: 60, 1: 5}, marker=1, gz=True)
    return root


@pytest.fixture
def fake_omniglot(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Omniglot-shaped random pools in place of what ``load_omniglot`` reads: 64 classes of 20
    images per split (the 60-way presets fit), so classification runs without the data.
    Returns the pools."""
    import metarun.data

    gen = torch.Generator().manual_seed(0)
    pools = {s: torch.rand(64, 20, 1, 28, 28, generator=gen) for s in ("train", "val", "test")}
    monkeypatch.setattr(metarun.data.omniglot, "load_omniglot", lambda root, **kw: pools)
    return pools


@pytest.fixture(scope="session")
def real_mnist() -> str:
    """``$METARUN_DATA``, which holds the real MNIST test file under ``mnist/raw/`` (the
    acceptance tests are skipped without it)."""
    data = os.environ.get("METARUN_DATA")
    if not data:
        pytest.skip("METARUN_DATA is unset: the acceptance tests read $METARUN_DATA/mnist/raw/")
    return data


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread within the test: on small matrices it is several times faster than
    two contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
