"""MAML and first-order MAML (one implementation; FOMAML is a flag), with optional learned inner
learning rates (a scalar, or Meta-SGD's elementwise rates).

References:
    Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    ICML 2017. Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
    2017.

Example::

    algo = MAML(Conv4(num_classes=5), task_type="classification", inner_lr=0.4,
                inner_steps=1, eval_inner_steps=3)
    meta_opt = torch.optim.Adam(algo.meta_parameters(), lr=1e-3)
    meta_opt.zero_grad(); algo.meta_train_step(batch); meta_opt.step()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun import registry
from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.losses import task_loss, task_metrics
from metarun.registry import BuildContext, register
from metarun.spec.bases import AlgoSchema
from metarun.spec.checks import require, require_optional_count
from metarun.spec.enums import BNPolicy, InnerLR, TaskBatching
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch
from metarun.unroll import SGD, functional_call, get_params, inner_loop
from metarun.unroll.batched import batch_stats_buffers, decomposed_batch_norm, func_inner_loop

log = logging.getLogger(__name__)


@dataclass
class MAMLConfig(AlgoSchema):
    """``algo=maml``: Finn et al. 2017, second-order unless ``first_order``."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    # Adaptation steps at validation/test time; the paper uses more than in training on Omniglot.
    eval_inner_steps: int = "${.inner_steps}"  # type: ignore[assignment]  # interpolation
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
        require(self.inner_lr > 0, "algo.inner_lr", self.inner_lr, "> 0", "algo.inner_lr=0.01")
        require(
            self.inner_steps >= 1,
            "algo.inner_steps",
            self.inner_steps,
            ">= 1",
            "algo.inner_steps=5",
        )
        require(
            self.eval_inner_steps >= 0,
            "algo.eval_inner_steps",
            self.eval_inner_steps,
            ">= 0",
            "algo.eval_inner_steps=10",
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


    def step_sizes(self) -> dict[str, float]:
        return {"algo.inner_lr": self.inner_lr}

    def check_run(self, run: Any) -> None:
        train_ways, eval_ways = run.dataset.ways()
        if train_ways != eval_ways:
            name = registry.option_of("algo", self).name
            raise ConfigError(
                f"dataset.eval_n_way must equal dataset.n_way ({train_ways}) for algo={name}, "
                f"got {eval_ways} (its model's classifier has one output per training class; "
                "leave dataset.eval_n_way unset, or use an algorithm without a classifier head "
                "such as a metric-based learner)"
            )


@dataclass
class FOMAMLConfig(MAMLConfig):
    """``algo=fomaml``: first-order MAML (Finn et al. 2017, Sec. 5.2), i.e. MAML without
    second derivatives."""

    first_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.first_order:
            raise ConfigError(
                "algo.first_order must be true for algo=fomaml, got False "
                "(use algo=maml for second-order MAML)"
            )


@register("algo", "fomaml", FOMAMLConfig)
@register("algo", "maml", MAMLConfig)
class MAML(MetaAlgorithm):
    """Model-agnostic meta-learning on :mod:`metarun.unroll`'s functional layer.

    Args:
        model: the network whose initial weights are meta-learned.
        task_type: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
        inner_lr: inner SGD learning rate (initial value when learned).
        inner_steps: inner steps during meta-training (>= 1).
        eval_inner_steps: inner steps when evaluating or adapting.
        first_order: first-order MAML: inner gradients detached, identity path kept.
        copy_initial_weights: ``True`` adapts detached copies: the model's own weights then get
            no meta-gradient (only learned learning rates are trained). A warning says so.
        learn_inner_lr: ``off``, ``scalar`` (one learned rate) or ``per_param`` (Meta-SGD: an
            elementwise rate for every parameter tensor).
        bn_policy: ``batch_stats``: normalise with the current batch's statistics in training
            and evaluation (the MAML reference code); ``running_stats``: meta-training updates
            the model's running statistics, evaluation uses them (model in eval mode).
        task_batching: ``loop``: one task after another, each task's graph freed before the
            next (least memory); ``vmap``: tasks as one ``torch.func.vmap`` computation,
            ``task_chunk_size`` at a time (memory for speed); ``auto``: the loop until
            :meth:`before_training` measures the candidates and keeps the fastest.
        task_chunk_size: tasks per vmapped chunk (``None``: the whole meta-batch).
        checkpoint_inner: recompute each inner step's forward during the meta-backward instead
            of storing its activations (less memory on long unrolls, ~1 extra forward per step;
            task loop only).

    Attributes:
        pre_adaptation_metrics: when true (default), ``meta_train_step`` also reports query
            metrics before adaptation (one extra no-grad forward per task); the runner turns it
            off on steps it does not log.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task_type: str,
        inner_lr: float,
        inner_steps: int,
        eval_inner_steps: int,
        first_order: bool = False,
        copy_initial_weights: bool = False,
        learn_inner_lr: str = "off",
        bn_policy: str = "batch_stats",
        task_batching: str = "loop",
        task_chunk_size: int | None = None,
        checkpoint_inner: bool = False,
        memory_budget_mb: float | None = None,
    ) -> None:
        super().__init__()
        if task_type not in ("classification", "regression"):
            raise ValueError(
                f"task_type must be 'classification' or 'regression', got {task_type!r}"
            )
        if inner_steps < 1 or eval_inner_steps < 0:
            raise ValueError(
                f"inner_steps must be >= 1 and eval_inner_steps >= 0, got {inner_steps} and "
                f"{eval_inner_steps}"
            )
        self.model = model
        self.task_type = task_type
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.copy_initial_weights = copy_initial_weights
        self.learn_inner_lr = InnerLR(learn_inner_lr)
        self.bn_policy = BNPolicy(bn_policy)
        self.task_batching = TaskBatching(task_batching)
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(
                f"task_chunk_size must be >= 1 or None, got {task_chunk_size} "
                "(set e.g. algo.task_chunk_size=8)"
            )
        self.task_chunk_size = task_chunk_size
        self.checkpoint_inner = checkpoint_inner
        self.memory_budget_mb = memory_budget_mb
        if checkpoint_inner and self.task_batching is TaskBatching.vmap:
            raise ValueError(
                "algo.checkpoint_inner=true works with task_batching=loop only "
                "(torch.func transforms do not support activation checkpointing)"
            )
        if self.task_batching is TaskBatching.vmap and self.bn_policy is not BNPolicy.batch_stats:
            raise ValueError(
                "task_batching=vmap needs bn_policy=batch_stats: tasks running at once cannot "
                "share running statistics; set algo.bn_policy=batch_stats or "
                "task_batching=loop"
            )
        # Substituting the norm layers' running statistics by None makes them normalise with
        # per-batch (under vmap: per-task) statistics and write nothing.
        self._stats_off = batch_stats_buffers(model)
        self._has_batch_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
        self.base_inner_lr = float(inner_lr)
        self.inner_lr: nn.Parameter | None = None
        self.inner_lrs: nn.ParameterDict | None = None
        if self.learn_inner_lr is InnerLR.scalar:
            self.inner_lr = nn.Parameter(torch.tensor(float(inner_lr)))
        elif self.learn_inner_lr is InnerLR.per_param:
            # ParameterDict keys may not contain dots.
            self.inner_lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.full_like(p.detach(), float(inner_lr)))
                    for n, p in model.named_parameters()
                    if p.requires_grad
                }
            )
        self._optimizer = SGD(lr=float(inner_lr))
        if copy_initial_weights:
            log.warning(
                "algo.copy_initial_weights=true: the inner loop starts from detached copies, so "
                "the model's initial weights receive NO meta-gradient and are not meta-learned "
                "(hypergrad/norm stays 0). Set algo.copy_initial_weights=false for MAML."
            )

    @classmethod
    def from_config(cls, config: MAMLConfig, model: nn.Module, context: BuildContext) -> MAML:
        return cls(model, **cls.init_kwargs(config, context))

    @classmethod
    def init_kwargs(cls, config: MAMLConfig, context: BuildContext) -> dict[str, Any]:
        """The constructor's keyword arguments from ``config``: a subclass with a schema
        extending :class:`MAMLConfig` adds its own keys to these (e.g. ANIL's ``head``)."""
        return dict(
            task_type=context.task_type,
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            eval_inner_steps=config.eval_inner_steps,
            first_order=config.first_order,
            copy_initial_weights=config.copy_initial_weights,
            learn_inner_lr=config.learn_inner_lr.value,
            bn_policy=config.bn_policy.value,
            task_batching=config.task_batching.value,
            task_chunk_size=config.task_chunk_size,
            checkpoint_inner=config.checkpoint_inner,
            memory_budget_mb=config.memory_budget_mb,
        )

    # -- runner hooks ------------------------------------------------------------------------
    def before_training(self, sample: Callable[[], TaskBatch], device: torch.device) -> None:
        """``task_batching=auto``: time loop / vmap / vmap chunks on one meta-batch and keep the
        fastest within ``memory_budget_mb`` (:mod:`metarun.algorithms.autotune`)."""
        if self.task_batching is not TaskBatching.auto:
            return
        from metarun.algorithms.autotune import choose_task_batching

        choose_task_batching(self, sample(), device, memory_budget_mb=self.memory_budget_mb)

    def extra_state(self) -> dict[str, Any]:
        """The task batching in use (what ``auto`` chose), so that a resumed run computes as
        before."""
        return {"task_batching": {"mode": self.task_batching.value, "chunk": self.task_chunk_size}}

    def load_extra_state(self, state: dict[str, Any] | None) -> None:
        chosen = (state or {}).get("task_batching")
        if chosen is not None:
            self.task_batching = TaskBatching(chosen["mode"])
            self.task_chunk_size = chosen["chunk"]

    def _hyper(self) -> dict[str, object]:
        if self.inner_lr is not None:
            return {"lr": self.inner_lr}
        if self.inner_lrs is not None:
            return {
                "lr": {
                    n: self.inner_lrs[_key(n)]
                    for n, p in self.model.named_parameters()
                    if p.requires_grad
                }
            }
        return {}

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.bn_policy is BNPolicy.batch_stats:
            return functional_call(self.model, params, x, buffers=self._stats_off)
        return functional_call(self.model, params, x)

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        return task_loss(self.task_type, out, y)

    def _metrics(self, out: Tensor, y: Tensor) -> dict[str, Tensor]:
        return task_metrics(self.task_type, out, y)

    def _task_metrics(self, out: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-task metrics of a batch of tasks, ``out`` (T, Q, ...) against ``y`` (T, Q, ...):
        one tensor op per metric, whatever the number of tasks."""
        if self.task_type == "classification":
            loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
            return {
                "loss": loss.view(y.shape).mean(-1),
                "accuracy": (out.argmax(-1) == y).float().mean(-1),
            }
        return {"loss": F.mse_loss(out, y, reduction="none").flatten(1).mean(1)}

    def _adapt(self, sx: Tensor, sy: Tensor, steps: int, *, track: bool) -> dict[str, Tensor]:
        params = get_params(self.model, copy=self.copy_initial_weights or not track)

        def inner_loss(p: dict[str, Tensor]) -> Tensor:
            return self._loss(self._forward(p, sx), sy)

        result = inner_loop(
            inner_loss,
            params,
            self._optimizer,
            steps,
            hyper=self._hyper(),
            first_order=self.first_order,
            track_higher_grads=track,
            checkpoint=self.checkpoint_inner and track,
        )
        return result.params

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, float]:
        """Meta-gradient of the mean query loss over the batch, accumulated task by task (each
        task's graph is freed before the next)."""
        if self.task_batching is TaskBatching.vmap:
            return self._meta_train_vmap(batch)
        n = len(batch)
        totals = _Totals()
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in batch.tensors())
            params = self._adapt(sx, sy, self.inner_steps, track=True)
            out = self._forward(params, qx)
            loss = self._loss(out, qy)
            (loss / n).backward()
            with torch.no_grad():
                totals.add("post", self._task_metrics(out[None], qy[None]))
                if self.pre_adaptation_metrics:
                    pre_out = self._forward(get_params(self.model), qx)
                    totals.add("pre", self._task_metrics(pre_out[None], qy[None]))
        return _with_meta_loss(totals.means(n))

    def _meta_train_vmap(self, batch: TaskBatch) -> dict[str, float]:
        n = len(batch)
        params = get_params(self.model, copy=self.copy_initial_weights)
        hyper = self._hyper()

        def task(
            p: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
        ) -> tuple[Tensor, Tensor]:
            def inner_loss(q: dict[str, Tensor]) -> Tensor:
                return self._loss(self._forward(q, sx), sy)

            adapted = func_inner_loop(
                inner_loss,
                p,
                self._optimizer,
                self.inner_steps,
                hyper=hyper,
                first_order=self.first_order,
            )
            out = self._forward(adapted, qx)
            return self._loss(out, qy), out

        batched = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))
        # Only the double backward of the native batch norm has the wrong vmap rule; first order
        # never differentiates an inner gradient, and the native kernel is 15-30% faster there.
        # Without batch norm the mode would only tax every other op (it intercepts them all).
        bn_mode = (
            decomposed_batch_norm
            if self._has_batch_norm and not self.first_order
            else contextlib.nullcontext
        )
        totals = _Totals()
        for chunk in batch.split(self.task_chunk_size or n):
            with bn_mode():
                losses, outs = batched(params, *chunk.tensors())
            (losses.sum() / n).backward()
            with torch.no_grad():
                totals.add("post", self._task_metrics(outs.detach(), chunk.query_y))
                if self.pre_adaptation_metrics:
                    pre = torch.func.vmap(self._forward, in_dims=(None, 0))(
                        get_params(self.model), chunk.query_x
                    )
                    totals.add("pre", self._task_metrics(pre, chunk.query_y))
        return _with_meta_loss(totals.means(n))

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        rows: dict[str, list[Tensor]] = {}
        with self._eval_mode():
            for i in range(len(batch)):
                sx, sy, qx, qy = (t[i] for t in batch.tensors())
                with torch.no_grad():
                    pre = self._metrics(self._forward(get_params(self.model), qx), qy)
                params = self._adapt(sx, sy, steps, track=False)
                with torch.no_grad():
                    post = self._metrics(self._forward(params, qx), qy)
                for prefix, metrics in (("pre", pre), ("post", post)):
                    for key, value in metrics.items():
                        rows.setdefault(f"{prefix}/{key}", []).append(value.float().cpu())
        return {k: torch.stack(v) for k, v in rows.items()}

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was = self.model.training
        self.model.train(self.bn_policy is BNPolicy.batch_stats)
        try:
            yield
        finally:
            self.model.train(was)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """Fast weights for one task (no task dimension), without a meta-graph."""
        steps = self.eval_inner_steps if steps is None else steps
        with self._eval_mode():
            return self._adapt(support_x, support_y, steps, track=False)

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        with self._eval_mode(), torch.no_grad():
            return self._forward(params, x)

    def log_scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.inner_lr is not None:
            out["inner_lr/value"] = float(self.inner_lr.detach())
            if self.inner_lr.grad is not None:
                out["inner_lr/hypergrad"] = float(self.inner_lr.grad)
        if self.inner_lrs is not None:
            sq = 0.0
            for key, p in self.inner_lrs.items():
                out[f"inner_lr/{key}"] = float(p.detach().mean())
                if p.grad is not None:
                    sq += float(p.grad.pow(2).sum())
            out["inner_lr/hypergrad_norm"] = sq**0.5
        return out


def _key(name: str) -> str:
    return name.replace(".", "__")


class _Totals:
    """Sums of per-task metrics kept on the device; read once per step (one host transfer
    instead of one per task and metric)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, prefix: str, per_task: dict[str, Tensor]) -> None:
        for key, values in per_task.items():
            name = f"train/{prefix}_{key}"
            total = values.sum()
            self.sums[name] = self.sums[name] + total if name in self.sums else total

    def means(self, n: int) -> dict[str, float]:
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).double().div(n).tolist()
        return dict(zip(names, values))


def _with_meta_loss(totals: dict[str, float]) -> dict[str, float]:
    # The outer objective under the name a user looks for (train/meta_loss), and under the
    # support/query vocabulary (train/query_loss): both are the post-adaptation query loss.
    totals["train/meta_loss"] = totals["train/query_loss"] = totals["train/post_loss"]
    return totals
