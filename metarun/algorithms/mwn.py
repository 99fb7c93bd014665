"""Meta-Weight-Net (MW-Net): a small MLP maps each example's training loss to its weight, and is
meta-learned by how a look-ahead step weighted by it changes the loss on a clean set.

References:
    Shu, Xie, Yi, Zhao, Zhou, Xu & Meng, "Meta-Weight-Net: Learning an Explicit Mapping For
    Sample Weighting", NeurIPS 2019 (Algorithm 1). Official code: xjtushujun/meta-weight-net
    (noisy labels) and xjtushujun/Meta-weight-net_class-imbalance.

Each training step, with a training batch (support) and a clean batch (query) in a
:class:`~metarun.tasks.TaskBatch` of one "task" (Algorithm 1, lines 4-8):

1. per-example losses ``l_i`` and weights ``V(l_i; theta)`` of the weight net ``V`` (the loss is
   its input as a constant: the paper's look-ahead gradient is ``sum_i V(l_i) grad l_i``),
   normalised to sum 1 over the batch (``algo.normalize``; else divided by the batch size);
2. one differentiable look-ahead step of the classifier's own optimizer on
   ``sum_i w_i * l_i`` (:class:`~metarun.algorithms.lookahead.LookAhead`, as L2RW): the model
   is untouched;
3. the clean loss at the look-ahead weights; its gradient w.r.t. ``theta`` steps the weight
   net's own optimizer (``algo.weight_net_optimizer``, owned by this algorithm: its state is
   saved in checkpoints through ``extra_state``);
4. weights from the *updated* ``V`` (no gradient), normalised likewise, and ``backward`` of
   ``sum_i w_i * l_i`` on the real model; the runner's optimizer steps.

The look-ahead steps the run's optimizer (momentum, weight decay and current learning rate
included); the official code looks ahead with plain SGD at the current rate. With
``meta_optimizer.momentum=0`` and no weight decay the two are the same.

Data parallel (several processes): each process looks ahead on its share of the batch (weights
normalised over its share), the weight nets' gradients are averaged over processes so every
process keeps the same weight net, and the real step's weights are normalised over the whole
batch. Unlike L2RW this is not the single-process step: the look-ahead sees a share only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun import registry
from metarun.algorithms.l2rw import ERMConfig, ReweightingBase
from metarun.algorithms.lookahead import LookAhead, check_lookahead_lr, lookahead_step_size
from metarun.registry import BuildContext
from metarun.spec.checks import require
from metarun.spec.enums import OptimizerName

log = logging.getLogger(__name__)

# Losses at which the learned weighting function is plotted (log_curves): cross-entropy of a
# confidently wrong prediction is a few nats; the paper's plots span about 0-10 (Fig. 1).
CURVE_LOSSES = (0.0, 10.0, 101)


class WeightNet(nn.Module):
    """``V(l; theta)``: loss ``(B,)`` -> weight ``(B,)`` in ``(0, 1)``; one hidden ReLU layer of
    ``hidden`` units and a sigmoid output (Shu et al. 2019, Sec. 3: 1-100-1)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, losses: Tensor) -> Tensor:
        h = torch.relu(self.hidden(losses.unsqueeze(-1)))  # (B, hidden)
        return torch.sigmoid(self.out(h)).squeeze(-1)  # (B,)


@dataclass
class MWNConfig(ERMConfig):
    """``algo=mwn``: Meta-Weight-Net (Shu et al. 2019, Algorithm 1). A 1-hidden-layer MLP maps
    each training loss to a weight; it is trained by the clean-set loss after a look-ahead step
    of the training optimizer (``meta_optimizer``) weighted by it. Defaults: the paper's code on
    noisy CIFAR (WRN-28-10 script): SGD, lr 1e-3, momentum 0.9 (Nesterov), weight decay 5e-4."""

    adaptation_keys: ClassVar[tuple[str, ...]] = ("weight_net_lr",)
    chosen_defaults: ClassVar[dict[str, str]] = {
        "weight_net_lr": "Shu et al. 2019's code for noisy CIFAR (MW-Net.py)"
    }
    chosen_for: ClassVar[tuple[str, ...]] = ("cifar10_noisy", "cifar100_noisy")

    weight_net_hidden: int = 100  # hidden units of the weight net (the paper: 100)
    weight_net_optimizer: OptimizerName = OptimizerName.sgd
    weight_net_lr: float = 0.001
    weight_net_momentum: float = 0.9  # sgd only
    weight_net_nesterov: bool = True  # sgd only
    weight_net_weight_decay: float = 0.0005
    # Weights normalised to sum 1 over the batch (the paper); false: divided by the batch size
    # (the official noisy-label script MW-Net.py).
    normalize: bool = True
    # Learning rate of the look-ahead step; null = the optimizer's own (meta_optimizer.lr).
    lookahead_lr: float | None = None

    def __post_init__(self) -> None:
        require(
            self.weight_net_hidden >= 1,
            "algo.weight_net_hidden",
            self.weight_net_hidden,
            ">= 1",
            "algo.weight_net_hidden=100",
        )
        require(
            self.weight_net_lr > 0,
            "algo.weight_net_lr",
            self.weight_net_lr,
            "> 0",
            "algo.weight_net_lr=0.001",
        )
        require(
            0 <= self.weight_net_momentum < 1,
            "algo.weight_net_momentum",
            self.weight_net_momentum,
            "in [0, 1)",
            "algo.weight_net_momentum=0.9",
        )
        require(
            not (self.weight_net_nesterov and self.weight_net_optimizer is OptimizerName.sgd)
            or self.weight_net_momentum > 0,
            "algo.weight_net_momentum",
            self.weight_net_momentum,
            "> 0 with algo.weight_net_nesterov=true (Nesterov needs momentum)",
            "algo.weight_net_nesterov=false",
        )
        require(
            self.weight_net_weight_decay >= 0,
            "algo.weight_net_weight_decay",
            self.weight_net_weight_decay,
            ">= 0",
            "algo.weight_net_weight_decay=0.0005",
        )
        check_lookahead_lr(self.lookahead_lr, "0.1")

    def step_sizes(self) -> dict[str, float]:
        return {"algo.weight_net_lr": self.weight_net_lr, **lookahead_step_size(self.lookahead_lr)}


def weight_net_optimizer(
    params: list[nn.Parameter],
    name: OptimizerName | str = OptimizerName.sgd,
    lr: float = 0.001,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0005,
) -> torch.optim.Optimizer:
    """The weight net's own optimizer (``algo.weight_net_*``)."""
    if OptimizerName(name) is OptimizerName.adam:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )


@registry.register("algo", "mwn", MWNConfig)
class MWN(ReweightingBase):
    """Meta-Weight-Net.

    Args:
        model: the classifier being trained.
        weight_net: ``V``; default a fresh :class:`WeightNet` of 100 hidden units.
        optimizer: factory of the weight net's optimizer from its parameters; default
            :func:`weight_net_optimizer` with its defaults.
        normalize: weights normalised to sum 1 over the batch; else divided by its size.
        lookahead_lr: learning rate of the look-ahead step (``None``: the optimizer's own).
        clean_as_train: also train on the clean set (appended to every batch).
        minority_class: label whose weight mass is logged (imbalanced MNIST).

    Example:
        >>> algo = MWN(model)
        >>> algo.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> metrics = algo.meta_train_step(batch)  # V updated; model grads left in .grad
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weight_net: nn.Module | None = None,
        optimizer: Any = None,
        normalize: bool = True,
        lookahead_lr: float | None = None,
        clean_as_train: bool = False,
        minority_class: int | None = None,
    ) -> None:
        super().__init__(model, clean_as_train=clean_as_train, minority_class=minority_class)
        self.weight_net = weight_net if weight_net is not None else WeightNet()
        make = optimizer if optimizer is not None else weight_net_optimizer
        self.weight_optimizer: torch.optim.Optimizer = make(list(self.weight_net.parameters()))
        self.normalize = normalize
        self.lookahead = LookAhead(model, lookahead_lr)

    @classmethod
    def from_config(cls, config: MWNConfig, model: nn.Module, context: BuildContext) -> MWN:
        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return weight_net_optimizer(
                params,
                config.weight_net_optimizer,
                lr=config.weight_net_lr,
                momentum=config.weight_net_momentum,
                nesterov=config.weight_net_nesterov,
                weight_decay=config.weight_net_weight_decay,
            )

        # The weight net's initial weights come from the run's seed, after the model's.
        weight_net = WeightNet(config.weight_net_hidden)
        device = next(model.parameters()).device
        return cls(
            model,
            weight_net=weight_net.to(device),
            optimizer=make,
            normalize=config.normalize,
            lookahead_lr=config.lookahead_lr,
            clean_as_train=config.clean_as_train,
            minority_class=context.dataset.minority_class,
        )

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The runner's optimizer over the model: the look-ahead steps a copy of it."""
        super().attach_optimizer(optimizer)
        self.lookahead.attach(optimizer)

    # -- weights ------------------------------------------------------------------------------

    def _normalise(self, v: Tensor, total: Tensor, count: int) -> Tensor:
        """``v / total`` (``normalize``; kept as is when the total is 0, as the official code)
        or ``v / count``."""
        if not self.normalize:
            return v / count
        if total != 0:
            return v / total
        return v

    def weigh(self, losses: Tensor) -> Tensor:
        """Step 1: the look-ahead's weights of this process's examples, differentiable in the
        weight net; the losses enter as constants."""
        v = self.weight_net(losses.detach())
        return self._normalise(v, v.sum(), losses.shape[0])

    def meta_gradient(
        self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Steps 1-3 without the update: the gradient of the clean loss after the look-ahead
        step w.r.t. the weight net's parameters (averaged over processes), and that loss."""
        ahead = self.lookahead(self.weigh, x, y, val_x, val_y)
        params = list(self.weight_net.parameters())
        raw = torch.autograd.grad(ahead.clean_loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, params)]
        if self.shards.world_size > 1:
            grads = self.shards.mean(grads)
        return grads, ahead.clean_loss.detach()

    def _weights_and_stats(
        self, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor
    ) -> tuple[Tensor | None, dict[str, Any]]:
        """Steps 1-3: update the weight net. The weights come from the updated net and the real
        forward's losses (:meth:`_weights_of_losses`), as in the official code."""
        grads, clean_after = self.meta_gradient(x, y, val_x, val_y)
        for p, g in zip(self.weight_net.parameters(), grads):
            p.grad = g
        self.weight_optimizer.step()
        self.weight_optimizer.zero_grad(set_to_none=True)
        norm = torch.cat([g.reshape(-1) for g in grads]).norm().detach()
        return None, {"weights/lookahead_clean_loss": clean_after, "weights/meta_grad_norm": norm}

    def _weights_of_losses(self, w: Tensor | None, losses: Tensor) -> Tensor:
        """Step 4: ``V(loss)`` of the updated weight net, without a gradient into it,
        normalised over all processes' examples."""
        with torch.no_grad():
            v = self.weight_net(losses)
            n = losses.shape[0] * self.shards.world_size
            return self._normalise(v, self.shards.total(v.sum()), n)

    # -- state and logging --------------------------------------------------------------------

    def meta_parameters(self) -> list[nn.Parameter]:
        # The runner's optimizer trains the classifier only; the weight net has its own.
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_state(self) -> dict[str, Any]:
        """The weight net's optimizer state (its weights are in ``state_dict``)."""
        return {"weight_optimizer": self.weight_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any] | None) -> None:
        if state is not None and "weight_optimizer" in state:
            self.weight_optimizer.load_state_dict(state["weight_optimizer"])

    def weighting_function(self, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The learned ``V`` on a grid of losses (default 0 to 10): ``(losses, weights)``, both
        ``(N,)`` on the CPU; un-normalised weights in ``(0, 1)``."""
        if losses is None:
            start, end, steps = CURVE_LOSSES
            losses = torch.linspace(start, end, int(steps))
        param = next(self.weight_net.parameters())
        with torch.no_grad():
            v = self.weight_net(losses.to(device=param.device, dtype=param.dtype))
        return losses.cpu(), v.detach().cpu()

    def log_curves(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {"weights/function": self.weighting_function()}
