"""Learning to reweight examples (L2RW): per-example weights chosen each step by how a
differentiable look-ahead step changes the loss on a small clean validation set.

References:
    Ren, Zeng, Yang & Urtasun, "Learning to Reweight Examples for Robust Deep Learning",
    ICML 2018 (Algorithm 1).

Each training step, with a training batch (support) and a clean batch (query) in a
:class:`~metarun.tasks.TaskBatch` of one "task":

1. per-example weights ``eps = 0`` (requires grad), weighted loss ``sum_i eps_i * loss_i``;
2. one differentiable look-ahead step of the model's own optimizer (type, settings and current
   state: :class:`~metarun.algorithms.lookahead.LookAhead`, shared with Meta-Weight-Net) from
   detached copies of the weights: the model is untouched;
3. clean loss at the look-ahead weights, and its gradient w.r.t. ``eps``;
4. ``w = max(-grad, 0)`` normalised to sum 1 (all zero if the sum is 0);
5. backward of ``sum_i w_i * loss_i`` on the real model; the runner's optimizer steps.

``algo=erm`` is the same loop with uniform weights (plain training).

Data parallel (several processes, :class:`~metarun.parallel.Shards`): each process takes an
equal share of the training and of the clean batch. The look-ahead weights at ``eps = 0`` are
the same everywhere, so the clean-loss gradient at them is averaged over processes and pulled
back to each process's own ``eps``; the weights are normalised by their global sum. The result
is the single-process step on the whole batch, except that BatchNorm normalises each process's
share (as DistributedDataParallel without SyncBatchNorm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun import registry
from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.lookahead import LookAhead, check_lookahead_lr, lookahead_step_size
from metarun.parallel import SINGLE, Shards
from metarun.registry import BuildContext
from metarun.spec.bases import SUPERVISED, AlgoSchema
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch
from metarun.unroll import functional_call

log = logging.getLogger(__name__)


def normalise_weights(grad_eps: Tensor, shards: Shards = SINGLE) -> Tensor:
    """Step 4 of L2RW: ``max(-grad, 0)`` normalised to sum 1 (over all processes' examples);
    all zeros when nothing is positive."""
    w = torch.clamp(-grad_eps, min=0.0)
    total = shards.total(w.sum())
    # torch.where rather than `if total > 0`: the same values without reading total to the host.
    return torch.where(total > 0, w / total, torch.zeros_like(w))


@dataclass
class ERMConfig(AlgoSchema):
    """``algo=erm``: plain training with uniform example weights, the baseline of Ren et al.
    2018; same model, optimizer (``meta_optimizer``) and schedule as ``algo=l2rw``."""

    # Also train on the clean set (appended to every training batch): the fair baseline of an
    # algo=l2rw run with clean_as_train=true.
    clean_as_train: bool = False

    task_kinds: ClassVar[tuple[str, ...]] = (SUPERVISED,)

    def check_run(self, run: Any) -> None:
        if run.meta_batch_size != 1:
            name = registry.option_of("algo", self).name
            raise ConfigError(
                f"meta_batch_size must be 1 for algo={name} (one training batch per step; its "
                f"size is dataset.batch_size), got {run.meta_batch_size} (set meta_batch_size=1)"
            )


@dataclass
class L2RWConfig(ERMConfig):
    """``algo=l2rw``: learning to reweight examples (Ren et al. 2018, Algorithm 1). Each step
    weights the training batch by how a look-ahead step of the training optimizer
    (``meta_optimizer``) on each example changes the loss on the clean set."""

    # Learning rate of the look-ahead step; null = the optimizer's own (meta_optimizer.lr).
    lookahead_lr: float | None = None

    def __post_init__(self) -> None:
        check_lookahead_lr(self.lookahead_lr, "0.001")

    def step_sizes(self) -> dict[str, float]:
        return lookahead_step_size(self.lookahead_lr)


class ReweightingBase(MetaAlgorithm):
    """Shared plumbing of example-reweighting algorithms (L2RW and the ERM baseline)."""

    splits_examples = True  # each process takes a share of the examples (set_shards)

    task_type = "classification"

    def __init__(
        self, model: nn.Module, *, clean_as_train: bool = False, minority_class: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.clean_as_train = clean_as_train
        self.minority_class = minority_class
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_weights: Tensor | None = None
        self.shards = SINGLE

    def set_shards(self, shards: Shards) -> None:
        """Data parallel: from now on each step uses this process's share of the examples, and
        the gradient left in ``.grad`` is meant to be averaged over the processes."""
        self.shards = shards

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The runner's optimizer over ``meta_parameters()``; L2RW's look-ahead copies it."""
        self.optimizer = optimizer

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def example_weights(self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor) -> Tensor:
        raise NotImplementedError

    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """One training step on task 0 of ``batch`` (support: training batch, query: clean
        batch): example weights, then ``backward`` of the weighted loss (no optimizer step).

        Metrics are 0-d tensors left on the device (the runner reads them on logged steps);
        ``val/clean_loss``, which costs a forward of the clean batch, only on logged steps."""
        if self.clean_as_train:
            x, y, vx, vy = batch.tensors()
            info = batch.support_info
            batch = TaskBatch(
                torch.cat([x, vx], 1),
                torch.cat([y, vy], 1),
                vx,
                vy,
                None if info is None else torch.cat([info, vy], 1),
            )
        shards = self.shards
        x, y = (shards.take(t[0], "dataset.batch_size") for t in (batch.support_x, batch.support_y))
        val_x, val_y = (
            shards.take(t[0], "the clean examples per step (dataset.clean_batch_size or n_val)")
            for t in (batch.query_x, batch.query_y)
        )
        w, extra = self._weights_and_stats(x, y, val_x, val_y)
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        w = self._weights_of_losses(w, losses.detach())
        weighted = (w * losses).sum()
        # The runner averages gradients over processes; the weights already sum to 1 over all
        # of them, so each process's share of the sum is scaled up by their number.
        (weighted * shards.world_size).backward()
        self.last_weights = w.detach()
        # Metrics are averaged over processes too: sums over examples are scaled likewise.
        weighted_loss = weighted.detach() * shards.world_size
        metrics: dict[str, Any] = {
            "train/loss": losses.detach().mean(),
            "train/weighted_loss": weighted_loss,
            # What the runner's optimizer minimises, under the tag every algorithm uses.
            "train/meta_loss": weighted_loss,
            "weights/zero_fraction": (w == 0).float().mean(),
            **extra,
        }
        # (The runner sets this flag on the steps it logs.)
        if self.pre_adaptation_metrics:
            metrics["val/clean_loss"] = self._clean_loss(val_x, val_y)
        if self.minority_class is not None:
            mass = w[y == self.minority_class].sum().detach()
            metrics["weights/minority_mass"] = mass * shards.world_size
        if batch.support_info is not None:
            flipped = shards.take(batch.support_info[0], "dataset.batch_size") != y
            metrics["weights/flipped_mass"] = w[flipped].sum().detach() * shards.world_size
        return metrics

    def _weights_and_stats(
        self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor
    ) -> tuple[Tensor | None, dict[str, Any]]:
        """The example weights ``(B,)`` of this process's share (summing to 1 over all
        processes) and metrics, before the real forward; ``None``: they depend on its losses
        (:meth:`_weights_of_losses`)."""
        raise NotImplementedError

    def _weights_of_losses(self, w: Tensor | None, losses: Tensor) -> Tensor:
        """The weights the real step uses, given the real forward's per-example losses
        (detached); by default those of :meth:`_weights_and_stats`."""
        if w is None:
            raise NotImplementedError(
                f"{type(self).__name__} returned no weights: override _weights_of_losses"
            )
        return w

    def _clean_loss(self, val_x: Tensor, val_y: Tensor) -> Tensor:
        # Eval mode: a logging forward must not move BatchNorm running statistics.
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return F.cross_entropy(self.model(val_x), val_y)
        finally:
            self.model.train(was)

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-example metrics on the query examples of every task, concatenated:
        ``post/accuracy``, ``post/error`` (``1 - accuracy``) and ``post/loss``, each ``(T*Q,)``.
        Nothing is adapted, so there are no ``pre/`` metrics; ``inner_steps`` is ignored."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                rows: dict[str, list[Tensor]] = {"post/accuracy": [], "post/loss": []}
                for i in range(len(batch)):
                    qx, qy = batch.query_x[i], batch.query_y[i]
                    out = self.model(qx)
                    rows["post/accuracy"].append((out.argmax(-1) == qy).float().cpu())
                    rows["post/loss"].append(
                        F.cross_entropy(out, qy, reduction="none").float().cpu()
                    )
        finally:
            self.model.train(was)
        res = {k: torch.cat(v) for k, v in rows.items()}
        # Error on the balanced MNIST test set: the paper's "balanced test error" (Fig. 2).
        res["post/error"] = 1.0 - res["post/accuracy"]
        return res

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                # metarun.unroll's call: right for weights tied through a reused module too.
                return functional_call(self.model, params, x)
        finally:
            self.model.train(was)

    def log_scalars(self) -> dict[str, float]:
        return {}

    def log_histograms(self) -> dict[str, Tensor]:
        return {} if self.last_weights is None else {"weights/examples": self.last_weights}


@registry.register("algo", "l2rw", L2RWConfig)
class L2RW(ReweightingBase):
    """Learning to reweight examples.

    Args:
        model: the classifier being trained.
        lookahead_lr: learning rate of the look-ahead step (``None``: the optimizer's own).
        clean_as_train: also train on the clean set (appended to every batch; off in the paper).
        minority_class: label whose weight mass is logged (imbalanced MNIST).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lookahead_lr: float | None = None,
        clean_as_train: bool = False,
        minority_class: int | None = None,
    ) -> None:
        super().__init__(model, clean_as_train=clean_as_train, minority_class=minority_class)
        self.lookahead = LookAhead(model, lookahead_lr)

    @property
    def lookahead_lr(self) -> float | None:
        """Learning rate of the look-ahead step (``None``: the optimizer's own)."""
        return self.lookahead.lr

    @lookahead_lr.setter
    def lookahead_lr(self, lr: float | None) -> None:
        self.lookahead.lr = lr

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The runner's optimizer over ``meta_parameters()``: the look-ahead steps a copy of it."""
        super().attach_optimizer(optimizer)
        self.lookahead.attach(optimizer)

    @classmethod
    def from_config(cls, config: L2RWConfig, model: nn.Module, context: BuildContext) -> L2RW:
        return cls(
            model,
            lookahead_lr=config.lookahead_lr,
            clean_as_train=config.clean_as_train,
            minority_class=context.dataset.minority_class,
        )

    def example_weights(self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor) -> Tensor:
        """Steps 1-4: the normalised example weights (detached)."""
        return self._weights_and_stats(x, y, val_x, val_y)[0]

    def eps_gradient(self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor) -> Tensor:
        """Gradient of the clean loss after the look-ahead step w.r.t. ``eps`` at ``eps = 0``
        (the clean loss over all processes' clean examples; ``eps`` of this process's)."""
        eps = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype, requires_grad=True)
        clean_loss, ahead = self._lookahead_val_loss(eps, x, y, val_x, val_y)
        if self.shards.world_size == 1:
            return torch.autograd.grad(clean_loss, eps)[0]
        # At eps = 0 the look-ahead weights do not depend on the data, so they are the same in
        # every process: average the clean-loss gradient there, then pull it back to eps.
        grads = torch.autograd.grad(clean_loss, ahead, retain_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(a) if g is None else g for g, a in zip(grads, ahead))
        mean = self.shards.mean(list(grads))
        (grad,) = torch.autograd.grad(ahead, eps, grad_outputs=mean, allow_unused=True)
        return torch.zeros_like(eps) if grad is None else grad

    def _lookahead_val_loss(
        self, eps: Tensor, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """The clean loss at the look-ahead weights (a step on ``sum_i eps_i * loss_i``), and
        those weights."""
        ahead = self.lookahead(lambda losses: eps, x, y, val_x, val_y)
        return ahead.clean_loss, ahead.params

    def _weights_and_stats(
        self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        grad = self.eps_gradient(x, y, val_x, val_y)
        w = normalise_weights(grad.detach(), self.shards)
        norm = self.shards.total(grad.detach().pow(2).sum()).sqrt()
        return w, {"weights/eps_grad_norm": norm}


@registry.register("algo", "erm", ERMConfig)
class ERM(ReweightingBase):
    """Plain training: uniform weights ``1/B`` (the L2RW paper's baseline).

    Args:
        model: the classifier being trained.
        clean_as_train: also train on the clean set (appended to every batch).
        minority_class: label whose weight mass is logged (imbalanced MNIST).
    """

    @classmethod
    def from_config(cls, config: ERMConfig, model: nn.Module, context: BuildContext) -> ERM:
        return cls(
            model,
            clean_as_train=config.clean_as_train,
            minority_class=context.dataset.minority_class,
        )

    def _weights_and_stats(
        self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        n = x.shape[0] * self.shards.world_size
        return torch.full((x.shape[0],), 1.0 / n, device=x.device, dtype=x.dtype), {}
