"""The one place that turns a validated :class:`~metarun.config.RunConfig` into objects, by
looking each option up in :mod:`metarun.registry` (no option is named here).

Everything else in the runner receives built objects; nothing else reads config groups.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from metarun import registry
from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.compiled import check_backend
from metarun.config import (
    ConfigError,
    MetaOptimizerConfig,
    OptimizerName,
    RunConfig,
    ScheduleName,
)
from metarun.registry import BuildContext
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device that exists.

    Raises:
        ConfigError: CUDA asked for but not available, or ``cuda:N`` beyond the device count.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device must be an available CUDA device, got {spec!r} but "
                "torch.cuda.is_available() is False (set device=cpu or device=auto)"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device must name one of the {count} CUDA devices, got {spec!r} "
                f"(set e.g. device=cuda:0)"
            )
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python and NumPy: model initialisation is then reproducible."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_model(config: Any) -> nn.Module:
    """``model`` group -> ``nn.Module`` (the option's registered builder)."""
    return registry.build("model", config)


def build_algorithm(config: Any, model: nn.Module, context: BuildContext) -> MetaAlgorithm:
    """``algo`` group -> a :class:`~metarun.algorithms.base.MetaAlgorithm` wrapping ``model``."""
    algorithm = registry.build("algo", config, model, context)
    if not isinstance(algorithm, MetaAlgorithm):
        raise TypeError(
            f"algo={registry.option_of('algo', config).name} built a "
            f"{type(algorithm).__name__}; algorithms must extend MetaAlgorithm"
        )
    return algorithm


def build_tasks(config: Any) -> TaskSources:
    """``dataset`` group -> training, validation and test task sources.

    Raises:
        ConfigError: settings the data cannot satisfy (e.g. ``dataset.n_way`` above the classes
            of a split); the message comes from the data module and names the key.
        FileNotFoundError: the data are not under ``dataset.root``.
    """
    try:
        return registry.build("dataset", config)  # type: ignore[no-any-return]
    except ConfigError:
        raise
    except ValueError as error:
        # The data modules check their arguments and name the config key in the message.
        raise ConfigError(str(error)) from None


def build_meta_optimizer(
    config: MetaOptimizerConfig, params: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """``meta_optimizer`` -> the outer-loop optimizer."""
    params = list(params)
    if config.name is OptimizerName.adam:
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.name is OptimizerName.sgd:
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    raise ConfigError(f"meta_optimizer.name has no builder for {config.name!r}")


@dataclass(frozen=True)
class LRSchedule:
    """``meta_optimizer.schedule``: the rate of outer step ``t`` (0-based) as a function of ``t``
    alone, so a resumed run needs no scheduler state and follows the config it runs with."""

    config: MetaOptimizerConfig
    outer_steps: int

    def factor(self, step: int) -> float:
        """The multiple of ``meta_optimizer.lr`` used at outer step ``step``."""
        cfg = self.config
        if cfg.schedule is ScheduleName.step:
            return cfg.gamma ** sum(step >= m for m in cfg.milestones)
        if cfg.schedule is ScheduleName.cosine:
            done = min(step, self.outer_steps) / self.outer_steps
            floor = cfg.min_lr / cfg.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        factor = self.factor(step)
        for group in optimizer.param_groups:
            # Each group's own starting rate, kept in the optimizer's (checkpointed) state.
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


def build_lr_schedule(config: MetaOptimizerConfig, outer_steps: int) -> LRSchedule | None:
    """``meta_optimizer.schedule`` -> the schedule (``None``: constant)."""
    if config.schedule is ScheduleName.constant:
        return None
    return LRSchedule(config, outer_steps)


@dataclass
class Experiment:
    """Everything a run needs, built from one config."""

    config: RunConfig
    device: torch.device
    algorithm: MetaAlgorithm
    task_type: str
    tasks: TaskSources | None  # None when built only to predict (metarun.load)


def build_experiment(
    config: RunConfig,
    *,
    with_data: bool = True,
    device: torch.device | None = None,
    seed: bool = True,
) -> Experiment:
    """Build the device, the data (unless ``with_data=False``), the model and the algorithm.

    Args:
        config: the validated configuration.
        with_data: also build the task sources (loads data sets).
        device: overrides ``config.device``.
        seed: seed every RNG with ``config.seed`` first, so that the initial weights depend on
            it only (``False`` when the weights are about to be loaded from a checkpoint).
    """
    device = device if device is not None else resolve_device(config.device)
    if seed:
        seed_everything(config.seed)
    tasks = build_tasks(config.dataset) if with_data else None
    if tasks is not None and config.test_dataset is not None:
        # Cross-domain: trained and validated on dataset, tested on test_dataset.
        tasks = dataclasses.replace(tasks, test=build_tasks(config.test_dataset).test)
    kind = config.dataset.task_type
    if seed:
        # Again: how much randomness the data set-up used must not change the initial weights.
        seed_everything(config.seed)
    model = build_model(config.model)
    algorithm = build_algorithm(config.algo, model, BuildContext(kind, config.dataset))
    algorithm.to(device)
    if config.compile:
        try:
            check_backend(config.compile_backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not algorithm.use_compile(config.compile_backend):
            logger.warning(
                "compile=true: algo=%s has no compiled path in this configuration; it runs "
                "eagerly (set compile=false to silence this)",
                registry.option_of("algo", config.algo).name,
            )
    return Experiment(
        config=config, device=device, algorithm=algorithm, task_type=kind, tasks=tasks
    )
