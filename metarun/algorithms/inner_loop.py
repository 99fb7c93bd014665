"""What MAML and ANIL share beyond the episodic parts: a model adapted by differentiable SGD
steps, configured by a :class:`~metarun.algorithms.maml.MAMLConfig`-shaped schema (or its keys
as keyword arguments), with MAML's BatchNorm policy and task batching."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from metarun.algorithms.batching import TaskBatchingMixin
from metarun.algorithms.episodic import EpisodicAlgorithm
from metarun.algorithms.losses import task_loss
from metarun.spec.checks import schema_from_keys
from metarun.spec.enums import BNPolicy
from metarun.unroll import functional_call
from metarun.unroll.batched import batch_stats_buffers


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

    def eval_training_mode(self) -> bool:
        return self.bn_policy is BNPolicy.batch_stats

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.bn_policy is BNPolicy.batch_stats:
            return functional_call(self.model, params, x, buffers=self._stats_off)
        return functional_call(self.model, params, x)

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        return task_loss(self.task_type, out, y)
