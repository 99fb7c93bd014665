"""MAML (Finn, Abbeel & Levine, ICML 2017) and its relatives as options of one class: first
order, learned inner rates (a scalar, Meta-SGD's elementwise, MAML++'s per layer and step) and
MAML++'s multi-step loss, per-step BatchNorm and derivative-order annealing
(:mod:`metarun.algorithms.stepwise`).

Example::

    algo = MAML(Conv4(num_classes=5), task_type="classification", inner_lr=0.4,
                inner_steps=1, eval_inner_steps=3)
    meta_opt = torch.optim.Adam(algo.meta_parameters(), lr=1e-3)
    meta_opt.zero_grad(); algo.meta_train_step(batch); meta_opt.step()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.episodic import MetricTotals, with_meta_loss
from metarun.algorithms.inner_loop import InnerLoopLearner
from metarun.algorithms.inner_rates import InnerRates
from metarun.algorithms.losses import task_metrics_per_task
from metarun.algorithms.stepwise import MAMLPPOptions, PerStepBatchNorm, StepwiseLoop
from metarun.registry import register
from metarun.spec.enums import InnerLR
from metarun.tasks import TaskBatch
from metarun.unroll import GradBackend, functional_call, get_params
from metarun.unroll.batched import decomposed_batch_norm

log = logging.getLogger(__name__)


@dataclass
class MAMLConfig(MAMLPPOptions):
    """``algo=maml``: Finn et al. 2017, second-order unless ``first_order``; the inner-loop keys
    (:class:`~metarun.algorithms.inner_loop.InnerLoopConfig`) and MAML++'s options
    (:class:`~metarun.algorithms.stepwise.MAMLPPOptions`), each off."""


@register("algo", "maml", MAMLConfig)
class MAML(InnerLoopLearner):
    """Model-agnostic meta-learning on :mod:`metarun.unroll`'s functional layer.

    Args: as :class:`~metarun.algorithms.inner_loop.InnerLoopLearner`'s, with
    :class:`MAMLConfig` (or its keys: ``MAML(model, task_type="regression", inner_lr=0.01,
    inner_steps=1, eval_inner_steps=10)``). ``pre_adaptation_metrics`` (set by the runner on the
    steps it logs): also report the query metrics before adaptation.
    """

    schema: ClassVar[type[MAMLConfig]] = MAMLConfig
    config: MAMLConfig

    def __init__(
        self, model: nn.Module, config: MAMLConfig | None = None, *, task_type: str, **keys: Any
    ) -> None:
        super().__init__(model, config, task_type=task_type, **keys)
        config = self.config
        self.learn_inner_lr = config.learn_inner_lr
        self.multi_step_loss = config.multi_step_loss
        self.msl_anneal_steps = config.msl_anneal_steps
        self.first_order_until = config.first_order_until
        self.outer_step = 0  # set by the runner before each step (set_step)
        self.per_step_bn = PerStepBatchNorm(model, self.inner_steps) if config.per_step_bn else None
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # What the inner loop adapts: per-step BatchNorm weights are meta-learned, not adapted.
        frozen = self.per_step_bn.affine_names if self.per_step_bn is not None else []
        adapted = [n for n in trainable if n not in frozen]
        self._all_names = {n: n for n in trainable}
        per_step = self.learn_inner_lr is InnerLR.per_layer_per_step
        self.rates = InnerRates(
            self.learn_inner_lr,
            config.inner_lr,
            {n: trainable[n] for n in adapted} if per_step else trainable,
            self.inner_steps,
        )
        self.rates.attach(self)
        # MAML++'s step-by-step loop when any of its options is on, else MAML's original loops.
        self._stepwise = (
            StepwiseLoop(self, self.per_step_bn, adapted)
            if self.multi_step_loss or config.per_step_bn or per_step
            else None
        )
        if self.copy_initial_weights:
            log.warning(
                "algo.copy_initial_weights=true: the inner loop starts from detached copies, so "
                "the model's initial weights receive NO meta-gradient and are not meta-learned "
                "(hypergrad/norm stays 0). Set algo.copy_initial_weights=false for MAML."
            )

    # -- runner hooks ------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """The completed outer steps: the multi-step loss weights and derivative-order annealing
        follow it (the runner restores it on resume, so a resumed run computes as before)."""
        self.outer_step = int(step)

    def _hyper(self) -> dict[str, object]:
        return self.rates.hyper(self._all_names)

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self._stepwise is not None and self.per_step_bn is not None:
            # Adapted parameters: their BatchNorm weights are the last step's copy already.
            return self._stepwise.forward_at(params, x, self.inner_steps - 1, support=False)
        return super()._forward(params, x)

    def _pre_forward(self, x: Tensor) -> Tensor:
        """The query forward before adaptation (with per-step BatchNorm: step 0's copy)."""
        if self._stepwise is not None:
            return self._stepwise.pre_forward(x)
        if self.model.training:
            # A measurement, asked for on logged steps only: it normalises the query with its
            # own statistics and writes no running statistics, or the weights would depend on
            # log.every under bn_policy=running_stats.
            return functional_call(self.model, get_params(self.model), x, buffers=self._stats_off)
        return self._forward(get_params(self.model), x)

    def _first_order_now(self) -> bool:
        """First order on this outer step: ``first_order``, or derivative-order annealing."""
        if self.first_order_until is not None and self.outer_step < self.first_order_until:
            return True
        return self.first_order

    def _adapt(
        self,
        sx: Tensor,
        sy: Tensor,
        steps: int,
        *,
        track: bool,
        params: dict[str, Tensor] | None = None,
        done: int = 0,
    ) -> dict[str, Tensor]:
        """``steps`` inner steps from the model's weights, or from ``params`` adapted by ``done``
        steps already (evaluation's curve: one adaptation, read along the way)."""
        if params is None:
            params = get_params(self.model, copy=self.copy_initial_weights or not track)
        if self._stepwise is not None:
            return self._stepwise.run(params, sx, sy, steps, track=track, first_step=done)[0]
        return self._steps(
            lambda p: self._loss(self._forward(p, sx), sy),
            params,
            steps,
            hyper=self._hyper(),
            first_order=self._first_order_now(),
            track=track,
        )

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """Meta-gradient of the mean query loss over the batch, task by task (each task's graph
        freed before the next) or vmapped chunk by chunk (:mod:`metarun.algorithms.batching`)."""
        totals = MetricTotals()

        def on_tasks(tasks: TaskBatch, losses: Tensor, outs: Tensor, batched: bool) -> None:
            if self._stepwise is not None or not batched:
                totals.add("post", task_metrics_per_task(self.task_type, outs, tasks.query_y))
                if self._stepwise is not None:
                    totals.add("meta", {"loss": losses})
            else:
                # Each task's meta-loss is its query loss after adaptation: only the accuracy
                # needs the outputs again (every kernel counts on small steps).
                post = {"loss": losses}
                if self.task_type == "classification":
                    post["accuracy"] = (outs.argmax(-1) == tasks.query_y).float().mean(-1)
                totals.add("post", post)
            if self.pre_adaptation_metrics:
                if batched:
                    pre = torch.func.vmap(self._pre_forward)(tasks.query_x)
                else:
                    pre = self._pre_forward(tasks.query_x[0])[None]
                totals.add("pre", task_metrics_per_task(self.task_type, pre, tasks.query_y))

        self.run_tasks(batch, self._one_task, self._batched_tasks, on_tasks)
        return with_meta_loss(totals.means(len(batch)))

    def _one_task(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        if self._stepwise is not None:
            initial = get_params(self.model, copy=self.copy_initial_weights)
            return self._stepwise.task(initial, sx, sy, qx, qy)
        params = self._adapt(sx, sy, self.inner_steps, track=True)
        out = self._forward(params, qx)
        return self._loss(out, qy), out

    def _batched_tasks(self) -> Callable[[TaskBatch], tuple[Tensor, Tensor]]:
        """The vmapped meta-loss of a chunk of tasks, with this step's shared arguments."""
        params = get_params(self.model, copy=self.copy_initial_weights)
        hyper = self._hyper()
        first_order = self._first_order_now()
        batched = self._compiled_step or torch.func.vmap(
            self._vmap_task, in_dims=(None, None, None, 0, 0, 0, 0)
        )
        # Only the double backward of the native batch norm has the wrong vmap rule; first order
        # never differentiates an inner gradient, and the native kernel is 15-30% faster there.
        # Without batch norm the mode would only tax every other op (it intercepts them all).
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        bn_mode = decomposed_batch_norm if has_bn and not first_order else contextlib.nullcontext

        def run(chunk: TaskBatch) -> tuple[Tensor, Tensor]:
            with bn_mode():
                return batched(params, hyper, first_order, *chunk.tensors())  # type: ignore[no-any-return]

        return run

    def _vmap_task(
        self,
        p: dict[str, Tensor],
        hyper: dict[str, object],
        first_order: bool,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One task's meta-loss and query outputs, for ``torch.func.vmap`` (a method, not a
        closure made per step, so that ``compile=true`` compiles it once)."""
        if self._stepwise is not None:
            return self._stepwise.task(p, sx, sy, qx, qy, grad=GradBackend.func)

        adapted = self._steps(
            lambda q: self._loss(self._forward(q, sx), sy),
            p,
            self.inner_steps,
            hyper=hyper,
            first_order=first_order,
            func=True,
        )
        out = self._forward(adapted, qx)
        return self._loss(out, qy), out

    def use_compile(self, backend: str) -> bool:
        """``compile=true``: the vmapped meta-step through ``torch.compile`` (task batching
        ``vmap``, or ``auto`` when it picks vmap; the loop stays eager)."""
        batched = torch.func.vmap(self._vmap_task, in_dims=(None, None, None, 0, 0, 0, 0))
        return self.compile_batched(batched, "MAML's vmapped meta-step", backend)

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor | None, Tensor]:
        pre, (out,) = self.evaluate_task_curve(sx, sy, qx, [steps])
        return pre, out

    curve_in_one_pass = True

    def evaluate_task_curve(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: Sequence[int]
    ) -> tuple[Tensor | None, list[Tensor]]:
        """One adaptation of ``steps[-1]`` steps, the query read after each of ``steps``."""
        with torch.no_grad():
            pre = self._pre_forward(qx)
        outs, params, done = [], None, 0
        for k in steps:
            # After 0 steps too: with per-step BatchNorm, adapted weights (0 steps included)
            # carry the last training step's copy, as predict expects; so the 0-step weights
            # are not where the later steps start (those begin from step 0's copy).
            adapted = self._adapt(sx, sy, k - done, track=False, params=params, done=done)
            if k > 0:
                params, done = adapted, k
            with torch.no_grad():
                outs.append(self._forward(adapted, qx))
        return pre, outs

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """Fast weights for one task (no task dimension), without a meta-graph."""
        steps = self.eval_inner_steps if steps is None else steps
        with self.eval_mode():
            return self._adapt(support_x, support_y, steps, track=False)
