"""The look-ahead step shared by example-reweighting algorithms (L2RW, Meta-Weight-Net).

Both ask the same question each training step: if the classifier took one step of its own
optimizer on a *weighted* training loss, what would the loss on the clean set be? The answer is
differentiable in the weights, so its gradient tells how to weight (L2RW: per-example ``eps``;
Meta-Weight-Net: the parameters of the network that maps losses to weights).

:class:`LookAhead` takes that step with :mod:`metarun.unroll`: detached copies of the model's
weights and private BatchNorm buffers (the model itself is untouched), and a differentiable
copy of the run's optimizer (type, settings, current learning rate and state: momentum buffers,
Adam moments) via :func:`~metarun.unroll.get_diff_optim`.

References:
    Ren, Zeng, Yang & Urtasun, "Learning to Reweight Examples for Robust Deep Learning",
    ICML 2018 (Algorithm 1, lines 4-9).
    Shu, Xie, Yi, Zhao, Zhou, Xu & Meng, "Meta-Weight-Net: Learning an Explicit Mapping For
    Sample Weighting", NeurIPS 2019 (Algorithm 1, lines 5-7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.spec.checks import require
from metarun.unroll import get_diff_optim, monkeypatch

# Per-example training losses (B,) -> per-example weights (B,), differentiable in whatever the
# algorithm learns (L2RW's eps, Meta-Weight-Net's weight net).
Weigh = Callable[[Tensor], Tensor]


@dataclass
class Ahead:
    """The result of a look-ahead step.

    Attributes:
        clean_loss: mean cross-entropy on the clean batch at the look-ahead weights (scalar,
            differentiable in the example weights).
        params: the look-ahead weights of the trainable parameters, in ``parameters()`` order.
        weights: the example weights the step used ``(B,)``.
    """

    clean_loss: Tensor
    params: list[Tensor]
    weights: Tensor


class LookAhead:
    """One differentiable step of the training optimizer on a weighted loss, then the clean loss.

    Args:
        model: the classifier; never modified (weights, buffers, gradients).
        lr: learning rate of the step; ``None``: the optimizer's own current rate.

    Call :meth:`attach` with the training optimizer before :meth:`__call__`.
    """

    def __init__(self, model: nn.Module, lr: float | None = None) -> None:
        if lr is not None and lr <= 0:
            raise ValueError(
                f"algo.lookahead_lr must be > 0 or null, got {lr} "
                "(null uses the optimizer's learning rate)"
            )
        self.model = model
        self.lr = lr
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose step is looked ahead (the runner's, over the model)."""
        self.optimizer = optimizer

    def __call__(self, weigh: Weigh, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor) -> Ahead:
        """Step on ``sum_i w_i * loss_i`` with ``w = weigh(losses)``, then the clean loss.

        Args:
            weigh: per-example losses ``(B,)`` -> weights ``(B,)``.
            x, y: the training batch ``(B, ...)``, ``(B,)``.
            val_x, val_y: the clean batch ``(V, ...)``, ``(V,)``.

        Raises:
            RuntimeError: no optimizer attached.
        """
        if self.optimizer is None:
            raise RuntimeError(
                "the look-ahead needs the training optimizer: call attach_optimizer(opt) first "
                "(the runner does this)"
            )
        # Detached copies and private BN buffers: the look-ahead leaves the model untouched.
        fmodel = monkeypatch(self.model, copy_initial_weights=True)
        override: dict[str, Any] | None = None
        if self.lr is not None:
            override = {"lr": [self.lr]}
        diffopt = get_diff_optim(
            self.optimizer, self.model.parameters(), fmodel=fmodel, override=override
        )
        losses = F.cross_entropy(fmodel(x), y, reduction="none")
        weights = weigh(losses)
        diffopt.step((weights * losses).sum())
        ahead = [p for p in fmodel.parameters() if p.requires_grad]
        return Ahead(F.cross_entropy(fmodel(val_x), val_y), ahead, weights)


def check_lookahead_lr(value: float | None, example: str) -> None:
    """``algo.lookahead_lr``: > 0, or null for the meta-optimizer's own rate."""
    require(
        value is None or value > 0,
        "algo.lookahead_lr",
        value,
        "> 0 or null (null = meta_optimizer.lr)",
        f"algo.lookahead_lr={example}",
    )


def lookahead_step_size(value: float | None) -> dict[str, float]:
    """``algo.lookahead_lr`` among a diverged run's step sizes, when it is set."""
    return {} if value is None else {"algo.lookahead_lr": value}
