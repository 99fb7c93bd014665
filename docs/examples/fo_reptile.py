"""First-order MAML whose outer update also pulls the initial weights towards each task's
adapted ones, as Reptile does: meta-gradient = mean_i [grad L_query(phi_i) + w (theta - phi_i)].
Task batching (loop, vmap, auto), evaluation with confidence intervals, device-side metrics,
checkpoints and resume come from metarun's shared parts (docs/extending.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.batching import TaskBatchingMixin
from metarun.algorithms.episodic import EpisodicAlgorithm, MetricTotals, with_meta_loss
from metarun.algorithms.losses import task_loss
from metarun.registry import BuildContext, register
from metarun.spec.bases import AlgoSchema
from metarun.spec.checks import require
from metarun.spec.enums import TaskBatching
from metarun.tasks import TaskBatch
from metarun.unroll import SGD, functional_call, get_params, inner_loop
from metarun.unroll.batched import batch_stats_buffers, func_inner_loop

Params = dict[str, Tensor]


@dataclass
class FOReptileConfig(AlgoSchema):
    adaptation_keys: ClassVar[tuple[str, ...]] = ("inner_lr", "inner_steps", "eval_inner_steps")

    inner_lr: float = "${adapt.inner_lr}"  # type: ignore[assignment]  # the data's inner loop
    inner_steps: int = "${adapt.inner_steps}"  # type: ignore[assignment]
    eval_inner_steps: int = "${adapt.eval_inner_steps}"  # type: ignore[assignment]
    reptile_weight: float = 0.5  # w; 0: first-order MAML
    task_batching: TaskBatching = TaskBatching.auto
    task_chunk_size: int | None = None

    def __post_init__(self) -> None:
        require(self.inner_lr > 0, "algo.inner_lr", self.inner_lr, "> 0", "algo.inner_lr=0.01")
        require(self.reptile_weight >= 0, "algo.reptile_weight", self.reptile_weight, ">= 0",
                "algo.reptile_weight=0.5")  # fmt: skip


@register("algo", "fo_reptile", FOReptileConfig)
class FOReptile(TaskBatchingMixin, EpisodicAlgorithm):
    def __init__(self, model: nn.Module, config: FOReptileConfig, task_type: str) -> None:
        super().__init__()
        self.model, self.config, self.task_type = model, config, task_type
        self.eval_inner_steps = config.eval_inner_steps
        self.init_task_batching(config.task_batching, config.task_chunk_size)
        self._sgd = SGD(lr=config.inner_lr)
        self._stats_off = batch_stats_buffers(model)  # batch norm: the batch's statistics

    @classmethod
    def from_config(cls, config: FOReptileConfig, model: nn.Module, context: BuildContext) -> Any:
        return cls(model, config, context.task_type)

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, x, buffers=self._stats_off)

    def _adapt(self, params: Params, sx: Tensor, sy: Tensor, steps: int, mode: str) -> Params:
        def loss(p: Params) -> Tensor:
            return task_loss(self.task_type, self._forward(p, sx), sy)

        if mode == "vmap":
            return func_inner_loop(loss, params, self._sgd, steps, first_order=True)
        track = mode == "train"
        return inner_loop(loss, params, self._sgd, steps, first_order=True,
                          track_higher_grads=track).params  # fmt: skip

    def _task(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
              mode: str = "train") -> tuple[Tensor, Tensor]:  # fmt: skip
        phi = self._adapt(params, sx, sy, self.config.inner_steps, mode)
        out = self._forward(phi, qx)
        # Gradient in theta: w (theta - phi), phi taken as a constant.
        pull = sum(((params[n] - phi[n].detach()) ** 2).sum() for n in phi)
        return task_loss(self.task_type, out, qy) + 0.5 * self.config.reptile_weight * pull, out

    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        totals, params = MetricTotals(), get_params(self.model)
        vmapped = torch.func.vmap(lambda *task: self._task(params, *task, mode="vmap"))
        self.run_tasks(
            batch,
            lambda *task: self._task(params, *task),
            lambda: lambda chunk: vmapped(*chunk.tensors()),
            lambda tasks, losses, outs, batched: totals.add("post", {"loss": losses}),
        )
        return with_meta_loss(totals.means(len(batch)))

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor, Tensor]:
        params = get_params(self.model, copy=True)
        phi = self._adapt(params, sx, sy, steps, "eval")
        return self._forward(params, qx).detach(), self._forward(phi, qx).detach()

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Params:
        steps = self.eval_steps(steps)
        return self._adapt(get_params(self.model, copy=True), support_x, support_y, steps, "eval")

    def predict(self, params: Params, x: Tensor) -> Tensor:
        return self._forward(params, x).detach()
