"""MAML-RL's outer steps on a meta-objective ``loss(params)``: TRPO (natural gradient by
conjugate gradient on Fisher-vector products, then a backtracking line search under a KL
constraint) and a PPO-style clipped objective as the cheaper option.

The conjugate gradient and the Hessian-vector products are :mod:`metarun.unroll.implicit`'s
(:class:`~metarun.unroll.implicit.CG`, :func:`~metarun.unroll.implicit.hvp`): the Fisher
matrix at the current parameters is the Hessian of the mean KL divergence from the current
(adapted) policy.

References:
    Schulman, Levine, Moritz, Jordan & Abbeel, "Trust Region Policy Optimization", ICML 2015
    (App. C: conjugate gradient and line search; rllab's ``ConjugateGradientOptimizer`` sets
    the defaults here: 10 CG iterations, damping 1e-5, backtrack ratio 0.8, 15 backtracks).
    Schulman, Wolski, Dhariwal, Radford & Klimov, "Proximal Policy Optimization Algorithms",
    2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metarun.unroll.implicit import CG, hvp

Params = dict[str, Tensor]


@dataclass
class OuterStep:
    """An outer step's parameter change and what it did.

    Attributes:
        step: the change to add to the parameters (zeros when the line search failed).
        loss_before: the meta-objective at the current parameters (0-d, detached).
        loss_after: at the parameters after the step.
        kl: the mean KL divergence from the current adapted policies to the new ones.
        backtracks: line-search halvings used (TRPO; -1: no acceptable step, none taken).
    """

    step: Params
    loss_before: Tensor
    loss_after: Tensor
    kl: Tensor
    backtracks: int


def trpo_step(
    loss: Callable[[Params], Tensor],
    kl: Callable[[Params], Tensor],
    params: Params,
    *,
    max_kl: float,
    damping: float = 1e-5,
    cg_iters: int = 10,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
) -> OuterStep:
    """One TRPO step from ``params``.

    The direction ``x = (F + damping I)^{-1} g`` (``g`` the gradient of ``loss``, ``F`` the
    Hessian of ``kl`` at ``params``, where ``kl`` is 0 and minimal) is scaled to the boundary
    ``x^T F x / 2 = max_kl`` of the quadratic model; the line search shrinks it by
    ``backtrack_ratio`` until ``loss`` decreases and ``kl <= max_kl`` both hold, and takes no
    step if none of ``max_backtracks`` tries does.

    Args:
        loss: the meta-objective (a scalar to minimise), a pure function of the parameters
            (``torch.func``-transformable).
        kl: the mean KL divergence from the policies at ``params`` to those at its argument.
        params: the current parameters (not modified).
    """
    point = {k: v.detach() for k, v in params.items()}
    # The gradient by autograd, not torch.func: a first-order inner loop detaches its inner
    # gradients, which torch.func.grad would differentiate through at an outer level.
    leaves = {k: v.clone().requires_grad_(True) for k, v in point.items()}
    grad = dict(zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values()))))
    fisher = hvp(kl, point)

    def damped(v: Params) -> Params:
        product = fisher(v)
        return {k: product[k] + damping * v[k] for k in v}

    # tol 0: always cg_iters products, as rllab's conjugate gradient.
    direction, _ = CG(tol=0.0, max_iter=cg_iters).solve(damped, grad)
    product = damped(direction)
    curvature = torch.stack([(direction[k] * product[k]).sum() for k in direction]).sum()
    scale = torch.sqrt(2 * max_kl / (curvature + 1e-8))
    full = {k: -scale * d for k, d in direction.items()}
    with torch.no_grad():
        before = loss(point)
        for tries in range(max_backtracks):
            ratio = backtrack_ratio**tries
            candidate = {k: point[k] + ratio * full[k] for k in point}
            after, divergence = loss(candidate), kl(candidate)
            ok = math.isfinite(float(after)) and float(after) < float(before)
            if ok and float(divergence) <= max_kl:
                step = {k: ratio * full[k] for k in point}
                return OuterStep(step, before, after, divergence, tries)
        zero = {k: torch.zeros_like(v) for k, v in point.items()}
        return OuterStep(zero, before, before, torch.zeros_like(before), -1)


def ppo_step(
    loss: Callable[[Params], Tensor],
    kl: Callable[[Params], Tensor],
    params: Params,
    *,
    lr: float,
    epochs: int,
) -> OuterStep:
    """``epochs`` Adam steps of learning rate ``lr`` on the (clipped) objective ``loss``, from
    ``params``, with a fresh Adam each outer step (so a resumed run needs no optimizer state).
    """
    point = {k: v.detach() for k, v in params.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in point.items()}
    optimizer = torch.optim.Adam(list(leaves.values()), lr=lr)
    with torch.no_grad():
        before = loss(point)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss(leaves).backward()
        optimizer.step()
    with torch.no_grad():
        new = {k: v.detach() for k, v in leaves.items()}
        after, divergence = loss(new), kl(new)
    step = {k: new[k] - point[k] for k in point}
    return OuterStep(step, before, after, divergence, 0)
