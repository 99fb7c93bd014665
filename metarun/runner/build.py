"""The one place that turns a validated :class:`~metarun.config.RunConfig` into objects.

Everything else in the runner receives built objects; nothing else reads config groups.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.config import (
    Cifar10NoisyConfig,
    ConfigError,
    Conv4Config,
    ERMConfig,
    L2RWConfig,
    LeNetConfig,
    MAMLConfig,
    MetaOptimizerConfig,
    MLPConfig,
    MnistImbalanceConfig,
    OmniglotConfig,
    OptimizerName,
    ResNet32Config,
    RunConfig,
    ScheduleName,
    SinusoidConfig,
    TaskBatching,
    WRN28_10Config,
)
from metarun.data.fewshot import TaskSource

logger = logging.getLogger(__name__)


@dataclass
class TaskSources:
    """Where tasks come from: training tasks are sampled afresh, val/test tasks are fixed."""

    train: TaskSource
    val: TaskSource
    test: TaskSource


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
    """``model`` group -> ``nn.Module``."""
    from metarun.models import MLP, Conv4, LeNet, resnet32, wrn28_10

    if isinstance(config, MLPConfig):
        return MLP(config.in_features, tuple(config.hidden), config.out_features)
    if isinstance(config, Conv4Config):
        return Conv4(
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            hidden=config.hidden,
            image_size=config.image_size,
            batch_norm=config.batch_norm,
            max_pool=config.max_pool,
        )
    if isinstance(config, LeNetConfig):
        return LeNet(
            num_classes=config.num_classes,
            in_channels=config.in_channels,
            variant=config.variant.value,
            image_size=config.image_size,
        )
    if isinstance(config, ResNet32Config):
        return resnet32(num_classes=config.num_classes)
    if isinstance(config, WRN28_10Config):
        return wrn28_10(num_classes=config.num_classes, dropout=config.dropout)
    raise ConfigError(f"model has no builder for {type(config).__name__}")


def minority_class(dataset: Any) -> int | None:
    """The label whose example-weight mass reweighting algorithms log: imbalanced MNIST's
    minority digit is label 0 (:func:`~metarun.data.load_mnist_imbalance`); else None."""
    return 0 if isinstance(dataset, MnistImbalanceConfig) else None


def build_algorithm(
    config: Any, model: nn.Module, task_type: str, *, minority_class: int | None = None
) -> MetaAlgorithm:
    """``algo`` group -> a :class:`~metarun.algorithms.base.MetaAlgorithm` wrapping ``model``.

    ``minority_class``: reweighting algorithms log the weight mass on this label.
    """
    if isinstance(config, L2RWConfig):
        from metarun.algorithms.l2rw import L2RW

        return L2RW(
            model,
            lookahead_lr=config.lookahead_lr,
            clean_as_train=config.clean_as_train,
            minority_class=minority_class,
        )
    if isinstance(config, ERMConfig):
        from metarun.algorithms.l2rw import ERM

        return ERM(model, clean_as_train=config.clean_as_train, minority_class=minority_class)
    if isinstance(config, MAMLConfig):  # also FOMAMLConfig, a subclass with first_order=True
        from metarun.algorithms.maml import MAML

        return MAML(
            model,
            task_type=task_type,
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            eval_inner_steps=config.eval_inner_steps,
            first_order=config.first_order,
            copy_initial_weights=config.copy_initial_weights,
            learn_inner_lr=config.learn_inner_lr.value,
            bn_policy=config.bn_policy.value,
            # auto starts from the loop; tune_task_batching measures and switches.
            task_batching="loop"
            if config.task_batching is TaskBatching.auto
            else config.task_batching.value,
            task_chunk_size=config.task_chunk_size,
            checkpoint_inner=config.checkpoint_inner,
        )
    raise ConfigError(f"algo has no builder for {type(config).__name__}")


def task_type(dataset: Any) -> str:
    """``"regression"`` or ``"classification"``, from the dataset's schema."""
    return str(dataset.task_type)


def build_tasks(config: Any) -> TaskSources:
    """``dataset`` group -> training, validation and test task sources.

    Raises:
        ConfigError: settings the data cannot satisfy (e.g. ``dataset.n_way`` above the classes
            of a split); the message comes from the data module and names the key.
        FileNotFoundError: the data are not under ``dataset.root``.
    """
    try:
        return _build_tasks(config)
    except ConfigError:
        raise
    except ValueError as error:
        # The data modules check their arguments and name the config key in the message.
        raise ConfigError(str(error)) from None


def _build_tasks(config: Any) -> TaskSources:
    if isinstance(config, MnistImbalanceConfig | Cifar10NoisyConfig):
        return _build_reweighting_tasks(config)
    eval_k_shot = config.eval_k_shot if config.eval_k_shot is not None else config.k_shot
    eval_k_query = config.eval_k_query if config.eval_k_query is not None else config.k_query
    if isinstance(config, SinusoidConfig):
        from metarun.data import SinusoidTasks

        amplitude, phase, x_range = (
            (float(r[0]), float(r[1])) for r in (config.amplitude, config.phase, config.x_range)
        )
        train = SinusoidTasks(config.k_shot, config.k_query, amplitude, phase, x_range)
        # One distribution: val and test differ from training only by their fixed seeds.
        held_out = SinusoidTasks(eval_k_shot, eval_k_query, amplitude, phase, x_range)
        return TaskSources(train=train, val=held_out, test=held_out)
    if isinstance(config, OmniglotConfig):
        from metarun.data import FewShotTasks, load_omniglot

        pools = load_omniglot(
            config.root,
            split=config.split.value,
            fractions=tuple(config.fractions),
            seed=config.split_seed,
            download=config.download,
            rotations=config.rotations,
            image_size=config.image_size,
            cache_dir=config.cache_dir,
        )
        # Pools stay in CPU memory: the trainer's prefetch thread samples there and copies each
        # meta-batch to the device through pinned memory, overlapping with the previous step.
        logger.info(
            "omniglot %s split: %s classes (train/val/test)",
            config.split.value,
            "/".join(str(int(pools[name].shape[0])) for name in ("train", "val", "test")),
        )
        n = config.n_way
        return TaskSources(
            train=FewShotTasks(pools["train"], n, config.k_shot, config.k_query),
            val=FewShotTasks(pools["val"], n, eval_k_shot, eval_k_query),
            test=FewShotTasks(pools["test"], n, eval_k_shot, eval_k_query),
        )
    raise ConfigError(f"dataset has no builder for {type(config).__name__}")


def _build_reweighting_tasks(config: MnistImbalanceConfig | Cifar10NoisyConfig) -> TaskSources:
    """Imbalanced MNIST / noisy CIFAR: each training step one task whose support is a training
    batch and whose query is the clean set (or a batch of it); validation on the whole clean
    set, test on the whole test set, example by example."""
    from metarun.data import (
        ExampleSet,
        ReweightingTasks,
        load_cifar_noisy,
        load_mnist_imbalance,
        random_crop_flip,
    )

    if isinstance(config, MnistImbalanceConfig):
        data = load_mnist_imbalance(
            config.root,
            pos_ratio=config.pos_ratio,
            n_train=config.n_train,
            n_val=config.n_val,
            n_test=config.n_test,
            digits=tuple(config.digits),
            source_split=config.source_split.value,
            seed=config.seed,
            download=config.download,
        )
        # Ren et al. 2018 (official code): the clean batch is min(batch size, n_val) = all 10.
        clean_batch_size = None
        augment = None
    else:  # also Cifar100NoisyConfig
        data = load_cifar_noisy(
            config.root,
            num_classes=config.num_classes,
            noise=config.noise,
            noise_type=config.noise_type.value,
            n_clean=config.n_clean,
            seed=config.seed,
            download=config.download,
            background=config.background,
        )
        clean_batch_size = config.clean_batch_size
        augment = (
            functools.partial(random_crop_flip, padding=config.crop_padding)
            if config.augment
            else None
        )
    return TaskSources(
        train=ReweightingTasks(data, config.batch_size, clean_batch_size, augment),
        val=ExampleSet(data.val_x, data.val_y),
        test=ExampleSet(data.test_x, data.test_y),
    )


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


def tune_task_batching(
    algorithm: MetaAlgorithm, config: RunConfig, tasks: TaskSources, device: torch.device
) -> None:
    """``algo.task_batching=auto``: time loop / vmap / vmap chunks on one meta-batch and keep the
    fastest within ``algo.memory_budget_mb`` (:mod:`metarun.runner.autotune`).

    The meta-batch comes from its own generator, so the training tasks are the same as without
    tuning.
    """
    from metarun.runner.autotune import choose_task_batching

    generator = torch.Generator().manual_seed(config.seed + 1)
    batch = tasks.train.sample(config.meta_batch_size, generator).to(device)
    choose_task_batching(algorithm, batch, device, memory_budget_mb=config.algo.memory_budget_mb)


def task_batching_state(algorithm: MetaAlgorithm) -> dict[str, Any] | None:
    """The algorithm's current task batching (what ``auto`` chose), for checkpoints."""
    mode = getattr(algorithm, "task_batching", None)
    if mode is None:
        return None
    return {"mode": str(getattr(mode, "value", mode)), "chunk": algorithm.task_chunk_size}  # type: ignore[attr-defined]


def restore_task_batching(algorithm: MetaAlgorithm, state: dict[str, Any] | None) -> None:
    """Re-apply a checkpoint's task batching (a resumed ``auto`` run computes as before)."""
    if state is None or not hasattr(algorithm, "task_batching"):
        return
    from metarun.algorithms.maml import TaskBatching as MAMLTaskBatching

    algorithm.task_batching = MAMLTaskBatching(state["mode"])  # type: ignore[attr-defined]
    algorithm.task_chunk_size = state["chunk"]  # type: ignore[attr-defined]


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
    kind = task_type(config.dataset)
    if seed:
        # Again: how much randomness the data set-up used must not change the initial weights.
        seed_everything(config.seed)
    model = build_model(config.model)
    algorithm = build_algorithm(
        config.algo, model, kind, minority_class=minority_class(config.dataset)
    )
    if not isinstance(algorithm, nn.Module):
        raise TypeError(f"algorithms must be nn.Modules, got {type(algorithm).__name__}")
    algorithm.to(device)
    return Experiment(
        config=config, device=device, algorithm=algorithm, task_type=kind, tasks=tasks
    )
