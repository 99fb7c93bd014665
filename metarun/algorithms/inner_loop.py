"""What MAML and ANIL share beyond the episodic parts: a model adapted by differentiable SGD
steps, configured by an :class:`InnerLoopConfig`-shaped schema (or its keys as keyword
arguments), with MAML's BatchNorm policy and task batching."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.batching import TaskBatchingMixin
from metarun.algorithms.episodic import EpisodicAlgorithm
from metarun.algorithms.inner_rates import InnerRates
from metarun.algorithms.losses import task_loss
from metarun.registry import BuildContext
from metarun.spec.bases import InnerStepSchema
from metarun.spec.checks import (
    require,
    require_inner_loop,
    require_optional_count,
    schema_from_keys,
)
from metarun.spec.enums import BNPolicy, InnerLR, TaskBatching
from metarun.spec.errors import ConfigError
from metarun.unroll import SGD, functional_call, inner_loop
from metarun.unroll.batched import batch_stats_buffers, func_inner_loop
from metarun.unroll.optimizers import Params


@dataclass
class InnerLoopConfig(InnerStepSchema):
    """The keys of a model adapted by SGD steps (MAML's, which ANIL and Meta-SGD share)."""

    adaptation_keys: ClassVar[tuple[str, ...]] = ("inner_lr", "inner_steps", "eval_inner_steps")

    # The inner loop as chosen for the run's data: the dataset file's `adapt` block (MAML's
    # settings for that data; generic defaults, reported at start-up, where it has none).
    inner_lr: float = "${adapt.inner_lr}"  # type: ignore[assignment]  # interpolation
    inner_steps: int = "${adapt.inner_steps}"  # type: ignore[assignment]
    # Adaptation steps at validation/test time; the paper uses more than in training on Omniglot.
    eval_inner_steps: int = "${adapt.eval_inner_steps}"  # type: ignore[assignment]
    first_order: bool = False
    # True: the model's weights get no meta-gradient (only e.g. learned inner lrs are meta-learned).
    copy_initial_weights: bool = False
    learn_inner_lr: InnerLR = InnerLR.off
    bn_policy: BNPolicy = BNPolicy.batch_stats
    # auto: measured at start-up (vmap wins for small models, the loop for conv nets with many
    # queries on a CPU); loop: the least memory.
    task_batching: TaskBatching = TaskBatching.auto
    task_chunk_size: int | None = None  # tasks per vmapped chunk; null = the whole meta-batch
    memory_budget_mb: float | None = None  # task_batching=auto: skip faster but bigger choices
    # Recompute inner forwards in the meta-backward: less memory on long unrolls (loop only).
    checkpoint_inner: bool = False

    def __post_init__(self) -> None:
        require_inner_loop(
            self.inner_lr, self.inner_steps, self.eval_inner_steps, lr="0.01", eval_steps="10"
        )
        require_optional_count(
            "algo.task_chunk_size", self.task_chunk_size, "algo.task_chunk_size=8"
        )
        require(
            self.memory_budget_mb is None or self.memory_budget_mb > 0,
            "algo.memory_budget_mb",
            self.memory_budget_mb,
            "> 0 or null",
            "algo.memory_budget_mb=4000",
        )
        if self.checkpoint_inner and self.task_batching is TaskBatching.vmap:
            raise ConfigError(
                "algo.checkpoint_inner=true needs algo.task_batching=loop or auto, got "
                "algo.task_batching=vmap (torch.func transforms do not support activation "
                "checkpointing; auto uses the loop)"
            )
        if self.task_batching is TaskBatching.vmap and self.bn_policy is not BNPolicy.batch_stats:
            raise ConfigError(
                f"algo.task_batching=vmap needs algo.bn_policy=batch_stats, got "
                f"algo.bn_policy={self.bn_policy.value} (tasks computed at once cannot share "
                "running statistics; set algo.task_batching=loop)"
            )


class InnerLoopLearner(TaskBatchingMixin, EpisodicAlgorithm):
    """Base of MAML and ANIL.

    Args:
        model: the network whose initial weights are meta-learned.
        config: the schema (``schema``: every key, its default, meaning and checks); or its
            keys as keyword arguments.
        task_type: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
    """

    schema: ClassVar[type[Any]]

    def __init__(
        self, model: nn.Module, config: Any = None, *, task_type: str, **keys: Any
    ) -> None:
        super().__init__()
        if task_type not in ("classification", "regression"):
            raise ValueError(
                f"task_type must be 'classification' or 'regression', got {task_type!r}"
            )
        config = config if config is not None else schema_from_keys(self.schema, keys)
        self.config = config
        self.model = model
        self.task_type = task_type
        self.inner_steps: int = config.inner_steps
        self.eval_inner_steps = config.eval_inner_steps
        self.first_order: bool = config.first_order
        self.copy_initial_weights: bool = config.copy_initial_weights
        self.bn_policy: BNPolicy = config.bn_policy
        self.checkpoint_inner: bool = config.checkpoint_inner
        self.init_task_batching(
            config.task_batching, config.task_chunk_size, config.memory_budget_mb
        )
        # Substituting the norm layers' running statistics by None makes them normalise with
        # per-batch (under vmap: per-task) statistics and write nothing.
        self._stats_off = batch_stats_buffers(model)
        self._optimizer = SGD(lr=float(config.inner_lr))
        self.rates: InnerRates  # set by the subclass: which weights the inner loop adapts

    @classmethod
    def from_config(cls, config: Any, model: nn.Module, context: BuildContext) -> Any:
        return cls(model, config, task_type=context.task_type)

    def _steps(
        self,
        inner_loss: Callable[[Params], Tensor],
        params: Params,
        steps: int,
        *,
        hyper: dict[str, object],
        first_order: bool,
        track: bool = True,
        func: bool = False,
    ) -> Params:
        """``params`` after ``steps`` differentiable SGD steps on ``inner_loss``; ``func``: with
        ``torch.func.grad``, to run under ``vmap``; ``track``: keep the graph of the steps."""
        if func:
            return func_inner_loop(
                inner_loss, params, self._optimizer, steps, hyper=hyper, first_order=first_order
            )
        return inner_loop(
            inner_loss,
            params,
            self._optimizer,
            steps,
            hyper=hyper,
            first_order=first_order,
            track_higher_grads=track,
            checkpoint=self.checkpoint_inner and track,
        ).params

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        with self.eval_mode(), torch.no_grad():
            return self._forward(params, x)

    def log_scalars(self) -> dict[str, float]:
        return self.rates.log_scalars()

    def eval_training_mode(self) -> bool:
        return self.bn_policy is BNPolicy.batch_stats

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.bn_policy is BNPolicy.batch_stats:
            return functional_call(self.model, params, x, buffers=self._stats_off)
        return functional_call(self.model, params, x)

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        return task_loss(self.task_type, out, y)
