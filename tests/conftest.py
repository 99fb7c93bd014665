"""Shared helpers: compose a config from ``conf/`` as the CLI does, tiny run settings."""

from __future__ import annotations

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


@pytest.fixture
def train(make_config: Callable[..., RunConfig], tiny: list[str]) -> Callable[..., RunSummary]:
    """``train(run_dir, overrides)``: a tiny run (``tiny`` plus ``overrides``) as the CLI does
    it. Test files that add their own settings to every run define their own ``train``."""

    def _train(run_dir: Path, overrides: Sequence[str] = ()) -> RunSummary:
        args = [*tiny, *overrides]
        return api.run(make_config(args), run_dir, overrides=args)

    return _train


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
