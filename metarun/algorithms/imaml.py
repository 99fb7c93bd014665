"""iMAML: MAML with implicit meta-gradients (the proximal inner problem, CG on its Hessian).

Each task adapts the meta-parameters ``theta`` by a few steps of an inner optimizer on the
support loss plus a proximal term, approximately solving

    phi*(theta) = argmin_phi  L_support(phi) + lam / 2 ||phi - theta||^2 .

At that solution ``grad L_support(phi*) + lam (phi* - theta) = 0``, and the implicit function
theorem gives ``d phi* / d theta = (I + H / lam)^-1`` with ``H`` the support loss's Hessian at
``phi*``. The meta-gradient of the query loss is therefore ``v = (I + H / lam)^-1 g``, ``g`` its
gradient at ``phi``, found by ``algo.cg_steps`` of conjugate gradient on Hessian-vector products
(:mod:`metarun.unroll.implicit`): nothing of the inner loop is kept for the backward pass, so
memory does not grow with the inner steps (scripts/bench_implicit.py).

``algo.cg_damping`` and ``algo.lam_damping`` (0 by default: the paper's system) damp the system
as the authors' code does, ``((1 + cg_damping) I + H / (lam + lam_damping)) v = g``.
BatchNorm layers normalise with each batch's statistics (MAML's ``bn_policy=batch_stats``).
``algo.task_batching=vmap`` computes a meta-batch's tasks as one ``torch.func.vmap``
computation (the same meta-gradient as the task loop, to rounding).

References:
    Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019
    (Algorithms 1 and 2; the GD variant: the inner problem solved by gradient descent).

Example::

    algo = IMAML(Conv4(num_classes=5), task_type="classification", lam=2.0, inner_lr=0.1,
                 inner_steps=16, eval_inner_steps=16, cg_steps=5)
    meta_opt = torch.optim.Adam(algo.meta_parameters(), lr=1e-3)
    meta_opt.zero_grad(); algo.meta_train_step(batch); meta_opt.step()
    logits = algo.predict(algo.adapt(support_x, support_y), query_x)   # (Q, N)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.batching import TaskBatchingMixin
from metarun.algorithms.episodic import EpisodicAlgorithm, MetricTotals, with_meta_loss
from metarun.algorithms.losses import task_loss, task_metrics
from metarun.algorithms.reptile import InnerOptimizer
from metarun.registry import BuildContext, register
from metarun.spec.bases import InnerStepSchema
from metarun.spec.checks import require, require_optional_count, schema_keys
from metarun.spec.enums import TaskBatching
from metarun.tasks import TaskBatch
from metarun.unroll import SGD, Adam, functional_call, inner_loop
from metarun.unroll.batched import batch_stats_buffers, decomposed_batch_norm, func_inner_loop
from metarun.unroll.implicit import CG, SolverInfo, hvp
from metarun.unroll.optimizers import FunctionalOptimizer, Params


@dataclass
class IMAMLConfig(InnerStepSchema):
    """``algo=imaml``: Rajeswaran et al. 2019, the GD variant by default."""

    adaptation_keys: ClassVar[tuple[str, ...]] = (
        "inner_lr", "inner_steps", "eval_inner_steps", "lam", "eval_lam",
    )  # fmt: skip
    chosen_defaults: ClassVar[dict[str, str]] = dict.fromkeys(
        ("inner_lr", "inner_steps", "eval_inner_steps", "lam", "eval_lam"),
        "Rajeswaran et al. 2019, Omniglot (GD variant)",
    )
    chosen_for: ClassVar[tuple[str, ...]] = ("omniglot",)

    # Strength of the proximal term lam/2 ||phi - theta||^2 of the inner problem.
    lam: float = 2.0
    inner_optimizer: InnerOptimizer = InnerOptimizer.sgd  # sgd: the paper's GD variant
    inner_lr: float = 0.1
    inner_steps: int = 16
    eval_inner_steps: int = "${.inner_steps}"  # type: ignore[assignment]  # interpolation
    # The proximal strength when adapting at evaluation (the authors test with 0: plain GD).
    eval_lam: float = "${.lam}"  # type: ignore[assignment]  # interpolation
    cg_steps: int = 5  # conjugate-gradient iterations (Hessian-vector products) per task
    # CG stops early at this relative residual; 0: always cg_steps iterations (the paper).
    cg_tol: float = 0.0
    # ((1 + cg_damping) I + H / (lam + lam_damping)) v = g; 0 and 0: the paper's (I + H/lam).
    cg_damping: float = 0.0
    lam_damping: float = 0.0
    # loop: one task after another; vmap: the meta-batch's tasks as one torch.func.vmap
    # computation (inner steps, CG and all), task_chunk_size at a time. No auto here.
    task_batching: TaskBatching = TaskBatching.loop
    task_chunk_size: int | None = None  # tasks per vmapped chunk; null = the whole meta-batch

    def __post_init__(self) -> None:
        require(self.lam > 0, "algo.lam", self.lam, "> 0", "algo.lam=2.0")
        require(self.inner_lr > 0, "algo.inner_lr", self.inner_lr, "> 0", "algo.inner_lr=0.1")
        require(
            self.inner_steps >= 1, "algo.inner_steps", self.inner_steps, ">= 1",
            "algo.inner_steps=16",
        )  # fmt: skip
        require(
            self.eval_inner_steps >= 0, "algo.eval_inner_steps", self.eval_inner_steps, ">= 0",
            "algo.eval_inner_steps=16",
        )  # fmt: skip
        require(self.eval_lam >= 0, "algo.eval_lam", self.eval_lam, ">= 0", "algo.eval_lam=0.0")
        require(self.cg_steps >= 1, "algo.cg_steps", self.cg_steps, ">= 1", "algo.cg_steps=5")
        for key, value, example in (
            ("algo.cg_tol", self.cg_tol, "algo.cg_tol=0.0"),
            ("algo.cg_damping", self.cg_damping, "algo.cg_damping=1.0"),
            ("algo.lam_damping", self.lam_damping, "algo.lam_damping=0.0"),
        ):
            require(value >= 0 and math.isfinite(value), key, value, ">= 0", example)
        require(
            self.task_batching is not TaskBatching.auto, "algo.task_batching",
            self.task_batching.value, "loop or vmap for algo=imaml (auto is MAML's)",
            "algo.task_batching=vmap",
        )  # fmt: skip
        require_optional_count(
            "algo.task_chunk_size", self.task_chunk_size, "algo.task_chunk_size=8"
        )


@register("algo", "imaml", IMAMLConfig)
class IMAML(TaskBatchingMixin, EpisodicAlgorithm):
    """Implicit MAML (Rajeswaran et al. 2019) on :mod:`metarun.unroll.implicit`.

    Args:
        model: the network whose weights ``theta`` are meta-learned.
        task_type: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
        lam: proximal strength ``lam`` of the inner problem in training (> 0).
        inner_lr: inner optimizer learning rate.
        inner_steps: inner optimizer steps in training (>= 1).
        eval_inner_steps: inner steps when evaluating or adapting.
        eval_lam: proximal strength when evaluating or adapting (>= 0; 0: plain fine-tuning).
        inner_optimizer: ``"sgd"`` (the paper's GD variant) or ``"adam"`` (fresh per task).
        cg_steps: conjugate-gradient iterations per task.
        cg_tol: relative residual at which CG stops early (0: never).
        cg_damping, lam_damping: the system solved is
            ``((1 + cg_damping) I + H / (lam + lam_damping)) v = g``.
        task_batching: ``"loop"`` (task after task) or ``"vmap"`` (tasks at once with
            ``torch.func.vmap``, ``task_chunk_size`` at a time; the same meta-gradient).
        task_chunk_size: tasks per vmapped chunk (``None``: the whole meta-batch).

    Attributes:
        pre_adaptation_metrics: as MAML's (set by the runner on logged steps).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task_type: str,
        lam: float,
        inner_lr: float,
        inner_steps: int,
        eval_inner_steps: int,
        eval_lam: float | None = None,
        inner_optimizer: str = "sgd",
        cg_steps: int = 5,
        cg_tol: float = 0.0,
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
        task_batching: str = "loop",
        task_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if task_type not in ("classification", "regression"):
            raise ValueError(
                f"task_type must be 'classification' or 'regression', got {task_type!r}"
            )
        if not lam > 0 or inner_steps < 1 or eval_inner_steps < 0:
            raise ValueError(
                f"lam must be > 0, inner_steps >= 1 and eval_inner_steps >= 0, got {lam}, "
                f"{inner_steps} and {eval_inner_steps}"
            )
        self.model = model
        self.task_type = task_type
        self.lam = float(lam)
        self.eval_lam = self.lam if eval_lam is None else float(eval_lam)
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.inner_optimizer = InnerOptimizer(inner_optimizer)
        self.solver = CG(tol=cg_tol, max_iter=cg_steps)
        self.cg_damping = float(cg_damping)
        self.lam_damping = float(lam_damping)
        if TaskBatching(task_batching) is TaskBatching.auto:
            raise ValueError("task_batching must be 'loop' or 'vmap' for iMAML, got 'auto'")
        self.init_task_batching(task_batching, task_chunk_size)
        self._stats_off = batch_stats_buffers(model)
        self._has_batch_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
        self.last_solver_info: SolverInfo | None = None

    @classmethod
    def from_config(cls, config: IMAMLConfig, model: nn.Module, context: BuildContext) -> IMAML:
        return cls(model, task_type=context.task_type, **schema_keys(config))

    # -- the computation ---------------------------------------------------------------------
    def _forward(self, params: Params, x: Tensor) -> Tensor:
        """The model with the (trainable) weights in ``params``; batch statistics in norms."""
        return functional_call(self.model, params, x, buffers=self._stats_off)

    def _theta(self) -> Params:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _optimizer(self) -> FunctionalOptimizer:
        if self.inner_optimizer is InnerOptimizer.adam:
            return Adam(lr=self.inner_lr)
        return SGD(lr=self.inner_lr)

    def _solve_inner(
        self, sx: Tensor, sy: Tensor, steps: int, lam: float, *, start: Params | None = None
    ) -> Params:
        """``phi``: ``steps`` inner steps from ``theta`` on the support loss plus the proximal
        term, without a graph (detached tensors). Under vmap, pass ``start`` (detached copies
        of ``theta`` that require grad, made outside: vmap refuses ``requires_grad_``); the
        gradients are then taken by ``torch.func``."""
        anchor = {n: p.detach() for n, p in self._theta().items()}
        batched = start is not None
        if start is None:
            start = {n: t.clone().requires_grad_() for n, t in anchor.items()}

        def objective(phi: Params) -> Tensor:
            loss = task_loss(self.task_type, self._forward(phi, sx), sy)
            if lam == 0:
                return loss
            prox = torch.stack([((phi[n] - anchor[n]) ** 2).sum() for n in phi]).sum()
            return loss + 0.5 * lam * prox

        if batched:
            # First order: inner gradients carry no graph, and phi is detached below.
            phi = func_inner_loop(objective, start, self._optimizer(), steps, first_order=True)
            return {n: t.detach() for n, t in phi.items()}
        result = inner_loop(objective, start, self._optimizer(), steps, track_higher_grads=False)
        return {n: t.detach() for n, t in result.params.items()}

    def meta_gradient(
        self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *, start: Params | None = None
    ) -> tuple[Params, Tensor, SolverInfo]:
        """One task's implicit meta-gradient ``v`` (keyed like the trainable parameters), its
        query output at ``phi`` (detached) and the CG solve's info. With ``start`` (see
        :meth:`_solve_inner`) it runs under vmap."""
        phi = self._solve_inner(sx, sy, self.inner_steps, self.lam, start=start)

        def query_loss(p: Params) -> tuple[Tensor, Tensor]:
            out = self._forward(p, qx)
            return task_loss(self.task_type, out, qy), out

        if start is not None:
            g, out = torch.func.grad(query_loss, has_aux=True)(phi)
        else:  # autograd holds less at its peak here (scripts/bench_implicit.py: 16 vs 21 MB)
            leaves = {n: t.clone().requires_grad_() for n, t in phi.items()}
            with torch.enable_grad():
                loss, out = query_loss(leaves)
                g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

        def support_loss(p: Params) -> Tensor:
            return task_loss(self.task_type, self._forward(p, sx), sy)

        hessian = hvp(support_loss, phi)
        identity = 1.0 + self.cg_damping
        scale = 1.0 / (self.lam + self.lam_damping)

        def matvec(v: Params) -> Params:
            hv = hessian(v)
            return {n: identity * v[n] + scale * hv[n] for n in v}

        v, info = self.solver.solve(matvec, g)
        return v, out.detach(), info

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """The mean over tasks of the implicit meta-gradients, added to ``.grad`` of the
        model's trainable parameters (:meth:`accumulate_meta_gradient`), task by task or
        vmapped chunk by chunk (:mod:`metarun.algorithms.batching`)."""
        theta = self._theta()
        totals = MetricTotals()
        residuals: list[Tensor] = []

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            v, out, info = self.meta_gradient(sx, sy, qx, qy)
            self.last_solver_info = info
            residuals.append(info.residual[None])
            return self._flat(v), out

        def make_batched() -> Callable[[TaskBatch], tuple[Tensor, Tensor]]:
            start = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}

            def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
                v, out, info = self.meta_gradient(sx, sy, qx, qy, start=start)
                return self._flat(v), out, info.residual

            batched = torch.func.vmap(task)
            # The HVP is a double backward, whose native batch-norm vmap rule is wrong in torch
            # 2.14 (metarun.unroll.batched): batch norm from elementary ops in the vmapped region.
            bn_mode = decomposed_batch_norm if self._has_batch_norm else contextlib.nullcontext

            def run(chunk: TaskBatch) -> tuple[Tensor, Tensor]:
                with bn_mode(), torch.no_grad():
                    vs, outs, found = batched(*chunk.tensors())
                residuals.append(found)
                return vs, outs

            return run

        def on_tasks(tasks: TaskBatch, vs: Tensor, outs: Tensor, batched: bool) -> None:
            for i in range(len(tasks)):
                qy = tasks.query_y[i]
                totals.add("post", task_metrics(self.task_type, outs[i], qy))
                if self.pre_adaptation_metrics:
                    pre = self._forward(theta, tasks.query_x[i])
                    totals.add("pre", task_metrics(self.task_type, pre, qy))

        self.run_tasks(batch, one_task, make_batched, on_tasks)
        totals.add("cg", {"residual": torch.cat(residuals)})
        return with_meta_loss(totals.means(len(batch)))

    def _flat(self, v: Params) -> Tensor:
        """A task's meta-gradient as one vector, so that the task batching carries it."""
        return torch.cat([v[n].reshape(-1) for n in self._theta()])

    def accumulate_meta_gradient(self, vs: Tensor, n: int, *, batched: bool) -> None:
        """Each task's implicit meta-gradient over ``n`` added to ``.grad``, task by task: it is
        solved, not backpropagated (a row of ``vs`` is :meth:`_flat`'s vector)."""
        theta = self._theta()
        for row in vs if batched else vs[None]:
            offset = 0
            for p in theta.values():
                step = row[offset : offset + p.numel()].view_as(p) / n
                offset += p.numel()
                p.grad = step if p.grad is None else p.grad + step

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor | None, Tensor]:
        phi = self._solve_inner(sx, sy, steps, self.eval_lam)
        with torch.no_grad():
            return self._forward(self._theta(), qx), self._forward(phi, qx)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """All of the model's weights for one task (no task dimension), without a meta-graph:
        the trainable ones adapted with ``eval_lam``, the frozen ones as they are."""
        steps = self.eval_inner_steps if steps is None else steps
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        params.update(self._solve_inner(support_x, support_y, steps, self.eval_lam))
        return params

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._forward(params, x)

    def log_scalars(self) -> dict[str, float]:
        if self.last_solver_info is None:
            return {}
        return {"imaml/cg_iterations": float(self.last_solver_info.iterations)}
