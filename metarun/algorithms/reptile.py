"""Reptile: train on a task with an ordinary optimizer, then move the initial weights towards the
trained ones.

Each outer step adapts every task of the meta-batch from the initial weights ``theta`` with
``inner_steps`` steps of a fresh inner optimizer (Adam with ``beta1 = 0`` in the paper's code, or
SGD) on mini-batches of its support set, giving ``phi_i``; the outer update is
``theta <- theta + eps_t * mean_i(phi_i - theta)``. No meta-graph is ever built.

Fitting the runner: :meth:`Reptile.meta_train_step` leaves the pseudo-gradient
``a_t * (theta - mean_i phi_i)`` in ``.grad`` and the runner's meta-optimizer steps. With
``meta_optimizer.name=sgd``, ``meta_optimizer.lr=eps`` (no momentum, no weight decay) that step
is exactly Reptile's update with ``eps_t = eps * a_t``. ``a_t`` is the linear annealing of the
paper (``--meta-step 1 --meta-step-final 0``): ``1 - (1 - anneal_final) * min(t, T) / T`` at
outer step ``t`` (0-based) with ``T = anneal_steps``, as ``train.py`` computes it. It is applied
here, to the pseudo-gradient, rather than as a runner learning-rate schedule, so that the runner
stays free of algorithm-specific code; ``t`` is counted in a registered buffer, so checkpoints
carry it and a resumed run anneals exactly as an uninterrupted one. (Scaling the gradient equals
scaling the rate for plain SGD only: Adam normalises the scale away, which a warning says.)

Mini-batches follow the paper's ``_mini_batches`` without replacement: the support set is
shuffled, cut into consecutive batches of ``inner_batch_size``, and shuffled again whenever it
runs out (a batch may straddle two passes); ``None`` uses the whole support set at every step.
Batch norm always normalises with the statistics of the batch it sees (the paper's model runs
``batch_normalization(training=True)`` at train and test time alike). At evaluation the
predictions are either transductive (all query examples in one batch, so batch-norm statistics
mix them, as MAML's code does) or not: each query example is predicted in a batch made of the
support set plus that one example (the paper's default), so no query example affects another's
prediction.

The inner optimizer's state is fresh for every task (Adam's moments and step count start at 0),
at training and at evaluation alike. (The paper's TensorFlow code differs here: after each
training task it restores only the trainable variables, so Adam's second-moment estimate and
step count carry over from task to task through the whole run; each evaluation task starts from
the state training left.)

The training mini-batch order is drawn from a generator seeded by the outer step and a seed
buffer (itself drawn from the run's seeded RNG at construction), the evaluation order from a
fixed seed: both are functions of checkpointed state, so resuming is exact, and a test task's
result does not depend on which tasks were evaluated with it.

References:
    Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018;
    code: github.com/openai/supervised-reptile (``reptile.py``, ``train.py``, ``models.py``).

Example::

    algo = Reptile(Conv4(num_classes=5), task_type="classification", inner_lr=0.001,
                   inner_steps=5, inner_batch_size=10, anneal_steps=100000)
    meta_opt = torch.optim.SGD(algo.meta_parameters(), lr=1.0)   # eps = 1.0
    meta_opt.zero_grad(); algo.meta_train_step(batch); meta_opt.step()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.episodic import EpisodicAlgorithm, with_meta_loss
from metarun.algorithms.losses import task_loss, task_metrics
from metarun.registry import BuildContext, register
from metarun.spec.bases import InnerStepSchema
from metarun.spec.checks import (
    require,
    require_inner_loop,
    require_optional_count,
    schema_keys,
)
from metarun.tasks import TaskBatch
from metarun.unroll import functional_call, get_params
from metarun.unroll.batched import batch_stats_buffers

log = logging.getLogger(__name__)

#: Key under which :meth:`Reptile.adapt` passes the support inputs to :meth:`Reptile.predict`
#: for non-transductive prediction (not a parameter name: those come from ``named_parameters``).
SUPPORT_KEY = "__support_x__"
#: Seed of the mini-batch order at evaluation: the same for every task (each task's support set
#: is in a random order already), so results depend neither on ``eval.batch_size`` nor on what
#: was evaluated before.
EVAL_ORDER_SEED = 1234


class InnerOptimizer(str, Enum):
    """``algo.inner_optimizer``: the per-task optimizer, started afresh for every task."""

    adam = "adam"  # the paper's (beta1 = 0)
    sgd = "sgd"


@dataclass
class ReptileConfig(InnerStepSchema):
    """``algo=reptile``: Nichol et al. 2018. The outer step size is ``meta_optimizer.lr`` (use
    ``meta_optimizer.name=sgd``); ``anneal_steps`` anneals it linearly."""

    adaptation_keys: ClassVar[tuple[str, ...]] = (
        "inner_lr", "inner_steps", "inner_batch_size", "eval_inner_steps",
        "eval_inner_batch_size",
    )  # fmt: skip
    # openai/supervised-reptile's Omniglot commands; their batch sizes and test steps are in the
    # experiment=omniglot_reptile_* presets.
    chosen_defaults: ClassVar[dict[str, str]] = dict.fromkeys(
        ("inner_lr", "inner_steps"), "Nichol et al. 2018 (openai/supervised-reptile, Omniglot)"
    )
    chosen_for: ClassVar[tuple[str, ...]] = ("omniglot",)
    # Evaluation only: training is the same either way (a checkpoint is tested both ways).
    evaluation_keys: ClassVar[tuple[str, ...]] = ("transductive", "query_chunk_size")
    # Keys counting outer steps, each on when set (metarun.config.checks).
    schedule_keys: ClassVar[dict[str, str | None]] = {"anneal_steps": None}

    inner_optimizer: InnerOptimizer = InnerOptimizer.adam
    inner_lr: float = 0.001
    # Adam only; the paper's code uses beta1 = 0 (models.py: AdamOptimizer(beta1=0)).
    inner_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    inner_eps: float = 1e-8  # Adam only
    inner_steps: int = 5
    # Support examples per inner step; null = the whole support set at every step.
    inner_batch_size: int | None = None
    eval_inner_steps: int = "${.inner_steps}"  # type: ignore[assignment]  # interpolation
    eval_inner_batch_size: int | None = "${.inner_batch_size}"  # type: ignore[assignment]
    # true: query examples predicted together (batch norm mixes them); false: each one with the
    # support set only (the paper's default).
    transductive: bool = False
    # Outer step size annealed linearly over this many outer steps (conf: ${outer_steps});
    # null = constant.
    anneal_steps: int | None = None
    # The multiple of meta_optimizer.lr reached at anneal_steps (paper: --meta-step-final 0).
    anneal_final: float = 0.0
    # Non-transductive prediction: query examples predicted at once (each with its own copy of
    # the support set); null = all of a task's.
    query_chunk_size: int | None = 64

    def __post_init__(self) -> None:
        require_inner_loop(
            self.inner_lr, self.inner_steps, self.eval_inner_steps, lr="0.001", eval_steps="50"
        )
        require_optional_count(
            "algo.inner_batch_size", self.inner_batch_size, "algo.inner_batch_size=10"
        )
        require_optional_count(
            "algo.eval_inner_batch_size", self.eval_inner_batch_size, "algo.eval_inner_batch_size=5"
        )
        betas = list(self.inner_betas)
        require(
            len(betas) == 2 and all(0 <= b < 1 for b in betas),
            "algo.inner_betas",
            betas,
            "two numbers in [0, 1)",
            "algo.inner_betas=[0,0.999]",
        )
        require(
            self.inner_eps >= 0, "algo.inner_eps", self.inner_eps, ">= 0", "algo.inner_eps=1e-8"
        )
        require(
            self.anneal_steps is None or self.anneal_steps >= 1,
            "algo.anneal_steps",
            self.anneal_steps,
            ">= 1 or null (null = no annealing)",
            "algo.anneal_steps=${outer_steps}",
        )
        require(
            self.anneal_final >= 0,
            "algo.anneal_final",
            self.anneal_final,
            ">= 0",
            "algo.anneal_final=0",
        )
        require_optional_count(
            "algo.query_chunk_size", self.query_chunk_size, "algo.query_chunk_size=64"
        )


def minibatch_indices(
    tasks: int, support_size: int, batch_size: int, steps: int, generator: torch.Generator
) -> Tensor:
    """Mini-batch positions into each task's support set, as the paper's ``_mini_batches``
    without replacement draws them: passes over the support set in a fresh random order,
    concatenated and cut into consecutive batches (a batch may straddle two passes).

    Returns:
        ``(tasks, steps, batch_size)`` int64 on the CPU.
    """
    need = steps * batch_size
    passes = -(-need // support_size)
    keys = torch.rand((tasks, passes, support_size), generator=generator, dtype=torch.float64)
    order = keys.argsort(dim=-1).reshape(tasks, passes * support_size)[:, :need]
    return order.reshape(tasks, steps, batch_size)


@register("algo", "reptile", ReptileConfig)
class Reptile(EpisodicAlgorithm):
    """Reptile (Nichol et al. 2018), batched over a meta-batch of tasks.

    Args:
        model: the network whose initial weights are meta-learned.
        task_type: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
        inner_optimizer: ``"adam"`` or ``"sgd"``; fresh state for every task.
        inner_lr: the inner optimizer's learning rate.
        inner_betas: Adam's ``(beta1, beta2)``.
        inner_eps: Adam's epsilon.
        inner_steps: inner steps per task during meta-training (>= 1).
        inner_batch_size: support examples per inner step (``None``: all).
        eval_inner_steps: inner steps when evaluating or adapting.
        eval_inner_batch_size: support examples per inner step then (``None``: all).
        transductive: predict a task's query examples in one batch (``True``) or each with the
            support set only (``False``).
        anneal_steps: outer steps over which the pseudo-gradient's factor goes linearly from 1
            to ``anneal_final`` (``None``: always 1).
        anneal_final: the factor from ``anneal_steps`` on.
        query_chunk_size: non-transductive prediction: query examples computed at once.

    Attributes:
        outer_step: buffer counting :meth:`meta_train_step` calls (the annealing's clock).
        order_seed: buffer seeding the training mini-batch order (drawn from the global RNG at
            construction, so it follows the run's ``seed``).
    """

    outer_step: Tensor
    order_seed: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        task_type: str,
        inner_optimizer: str = "adam",
        inner_lr: float = 0.001,
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_eps: float = 1e-8,
        inner_steps: int = 5,
        inner_batch_size: int | None = None,
        eval_inner_steps: int | None = None,
        eval_inner_batch_size: int | None = None,
        transductive: bool = False,
        anneal_steps: int | None = None,
        anneal_final: float = 0.0,
        query_chunk_size: int | None = 64,
    ) -> None:
        super().__init__()
        if task_type not in ("classification", "regression"):
            raise ValueError(
                f"task_type must be 'classification' or 'regression', got {task_type!r}"
            )
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        if inner_steps < 1 or eval_inner_steps < 0:
            raise ValueError(
                f"inner_steps must be >= 1 and eval_inner_steps >= 0, got {inner_steps} and "
                f"{eval_inner_steps}"
            )
        for key, value in (
            ("inner_batch_size", inner_batch_size),
            ("eval_inner_batch_size", eval_inner_batch_size),
            ("anneal_steps", anneal_steps),
            ("query_chunk_size", query_chunk_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        self.model = model
        self.task_type = task_type
        self.inner_optimizer = InnerOptimizer(inner_optimizer)
        self.inner_steps = inner_steps
        self.inner_batch_size = inner_batch_size
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        self.transductive = transductive
        self.anneal_steps = anneal_steps
        self.anneal_final = float(anneal_final)
        self.query_chunk_size = query_chunk_size
        self.inner_lr = float(inner_lr)
        self.inner_betas = (float(inner_betas[0]), float(inner_betas[1]))
        self.inner_eps = float(inner_eps)
        # Running statistics substituted by None: batch norm always uses the batch's statistics
        # (the paper's model: batch_normalization(training=True)) and writes nothing.
        self._stats_off = batch_stats_buffers(model)
        # Whether a prediction can depend on the other examples of its batch: only then does
        # non-transductive prediction need a batch per query example.
        self._mixes_batch = any(
            isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules()
        )
        self.register_buffer("outer_step", torch.zeros((), dtype=torch.long))
        self._clock: int | None = None  # set_step: the runner's completed outer steps
        seed = torch.randint(0, 2**62, (), dtype=torch.long)
        self.register_buffer("order_seed", seed)

    @classmethod
    def from_config(cls, config: ReptileConfig, model: nn.Module, context: BuildContext) -> Reptile:
        return cls(model, task_type=context.task_type, **schema_keys(config))

    # -- runner hooks ------------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn when the meta-optimizer's step is not Reptile's interpolation."""
        what = type(optimizer).__name__
        if isinstance(optimizer, torch.optim.SGD):
            if any(group.get("momentum", 0) for group in optimizer.param_groups):
                log.warning(
                    "algo=reptile with meta_optimizer SGD with momentum: the outer step is not "
                    "exactly Reptile's theta + eps * (mean phi - theta) (set "
                    "meta_optimizer.momentum=0 for that)"
                )
            return
        annealing = (
            f" The annealing (algo.anneal_steps={self.anneal_steps}) scales the pseudo-gradient, "
            f"which {what} normalises away: to decay {what}'s rate use meta_optimizer.schedule."
            if self.anneal_steps is not None
            else ""
        )
        log.warning(
            "algo=reptile with meta_optimizer %s: the outer step is %s on the pseudo-gradient "
            "theta - mean phi, not Reptile's theta + eps * (mean phi - theta) (for that, set "
            "meta_optimizer.name=sgd meta_optimizer.lr=<eps>, e.g. 1.0 as the paper).%s",
            what,
            what,
            annealing,
        )

    def log_scalars(self) -> dict[str, float]:
        # outer_step already counts the step just taken.
        return {"train/anneal_factor": self.anneal_factor(int(self.outer_step) - 1)}

    # -- pieces --------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """The runner's completed outer steps before the next :meth:`meta_train_step`: what
        ``outer_step`` counts (both are checkpointed), known on the host."""
        self._clock = step

    def anneal_factor(self, step: int) -> float:
        """The pseudo-gradient's factor at outer step ``step`` (0-based):
        ``1 - (1 - anneal_final) * min(step, anneal_steps) / anneal_steps``."""
        if self.anneal_steps is None:
            return 1.0
        done = min(max(step, 0), self.anneal_steps) / self.anneal_steps
        return 1.0 - (1.0 - self.anneal_final) * done

    def train_generator(self, step: int) -> torch.Generator:
        """The generator of outer step ``step``'s mini-batch order: a function of the step and
        :attr:`order_seed` only, so a resumed run draws what an uninterrupted one would."""
        mixed = (int(self.order_seed) + step * 0x9E3779B97F4A7C15) % 2**63
        return torch.Generator().manual_seed(mixed)

    def train_orders(self, batch: TaskBatch, step: int | None = None) -> Tensor | None:
        """Mini-batch positions of outer step ``step`` (default: the next one) for ``batch``:
        ``(T, inner_steps, inner_batch_size)``, or ``None`` for full-batch steps."""
        step = int(self.outer_step) if step is None else step
        if self.inner_batch_size is None:
            return None
        t, s = batch.support_x.shape[:2]
        return minibatch_indices(
            t, s, self.inner_batch_size, self.inner_steps, self.train_generator(step)
        )

    def _eval_order(self, support_size: int, steps: int) -> Tensor | None:
        if self.eval_inner_batch_size is None or steps == 0:
            return None
        generator = torch.Generator().manual_seed(EVAL_ORDER_SEED)
        return minibatch_indices(1, support_size, self.eval_inner_batch_size, steps, generator)[0]

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, params, x, buffers=self._stats_off)

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        return task_loss(self.task_type, out, y)

    def _metrics(self, out: Tensor, y: Tensor) -> dict[str, Tensor]:
        return task_metrics(self.task_type, out, y)

    def _inner_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """A fresh ``torch.optim`` optimizer over ``params``: a new state for every task."""
        if self.inner_optimizer is InnerOptimizer.adam:
            return torch.optim.Adam(
                params, lr=self.inner_lr, betas=self.inner_betas, eps=self.inner_eps
            )
        return torch.optim.SGD(params, lr=self.inner_lr)

    def _adapt(self, sx: Tensor, sy: Tensor, order: Tensor | None, steps: int) -> dict[str, Tensor]:
        """``steps`` steps of a fresh inner optimizer from copies of the weights, on the support
        mini-batches ``order`` (``(steps, B)`` positions; ``None``: all examples). Nothing is
        differentiated through the loop, so the copies are ordinary leaves stepped by
        ``torch.optim`` (its multi-tensor kernels), not a differentiable unroll.

        Returns:
            The adapted weights ``phi``, detached, keyed like ``named_parameters()``.
        """
        params = get_params(self.model, copy=True)
        trainable = [p for p in params.values() if p.requires_grad]
        optimizer = self._inner_optimizer(trainable)
        if order is not None:
            order = order.to(sx.device)
        with torch.enable_grad():
            for t in range(steps):
                xb, yb = (sx, sy) if order is None else (sx[order[t]], sy[order[t]])
                loss = self._loss(self._forward(params, xb), yb)
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
                for p, g in zip(trainable, grads):
                    p.grad = g  # None (unused parameter): the optimizer leaves it alone
                optimizer.step()
        return {n: p.detach() for n, p in params.items()}

    def _predict(self, params: dict[str, Tensor], x: Tensor, support_x: Tensor | None) -> Tensor:
        """Outputs for ``x`` ``(Q, *in)``: in one batch (transductive, or a model whose outputs
        never depend on the rest of the batch), else each example in a batch of the support set
        plus itself (its output is that batch's last row)."""
        with torch.no_grad():
            if self.transductive or support_x is None or not self._mixes_batch:
                return self._forward(params, x)

            def one(xq: Tensor) -> Tensor:
                return self._forward(params, torch.cat([support_x, xq.unsqueeze(0)]))[-1]

            return torch.func.vmap(one, chunk_size=self.query_chunk_size)(x)

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """Adapt every task, then leave ``a_t * (theta - mean_i phi_i)`` in ``.grad``.

        Metrics: ``train/meta_loss`` is the query
        loss after adaptation, computed without a graph with the query examples in one batch,
        as MAML's (Reptile does not differentiate it: it is the comparable diagnostic);
        ``train/accuracy``, and ``train/pre_*`` before adaptation on logged steps. The
        runner's ``hypergrad/norm`` is then the norm of the (annealed) pseudo-gradient.
        """
        # The runner's count when it gave one (the same steps, without a read from the device).
        step = int(self.outer_step) if self._clock is None else self._clock
        self._clock = None
        factor = self.anneal_factor(step)
        orders = self.train_orders(batch, step)
        n = len(batch)
        theta = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        mean_phi = {name: torch.zeros_like(p) for name, p in theta.items()}
        totals: dict[str, Any] = {}
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in batch.tensors())
            phi = self._adapt(sx, sy, None if orders is None else orders[i], self.inner_steps)
            with torch.no_grad():
                for name in mean_phi:
                    mean_phi[name].add_(phi[name], alpha=1.0 / n)
                groups = [("post", self._metrics(self._forward(phi, qx), qy))]
                if self.pre_adaptation_metrics:
                    pre = self._forward(get_params(self.model), qx)
                    groups.append(("pre", self._metrics(pre, qy)))
            for prefix, metrics in groups:
                for key, value in metrics.items():
                    name = f"train/{prefix}_{key}"
                    # Summed on the device: the runner reads them on logged steps only.
                    totals[name] = totals.get(name, 0.0) + value.detach().double() / n
        with torch.no_grad():
            for name, p in theta.items():
                pseudo = (p.detach() - mean_phi[name]).mul_(factor)
                if p.grad is None:
                    p.grad = pseudo
                else:
                    p.grad.add_(pseudo)
            self.outer_step.add_(1)
        return with_meta_loss(totals)

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor | None, Tensor]:
        """Query outputs around ``steps`` steps on mini-batches of ``eval_inner_batch_size``,
        predicted transductively or not as configured."""
        pre = self._predict(get_params(self.model), qx, sx)
        params = self._adapt(sx, sy, self._eval_order(sx.shape[0], steps), steps)
        return pre, self._predict(params, qx, sx)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """Adapted weights for one task (no task dimension); for non-transductive prediction
        also the support inputs, under :data:`SUPPORT_KEY`."""
        steps = self.eval_inner_steps if steps is None else steps
        params = self._adapt(
            support_x, support_y, self._eval_order(support_x.shape[0], steps), steps
        )
        if not self.transductive:
            params[SUPPORT_KEY] = support_x
        return params

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        weights = {k: v for k, v in params.items() if k != SUPPORT_KEY}
        return self._predict(weights, x, params.get(SUPPORT_KEY))
