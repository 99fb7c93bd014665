"""metarun's differentiable-unroll core: inner loops as differentiable functions.

Two layers, both public:

- the functional layer (:mod:`metarun.unroll.functional`, :mod:`metarun.unroll.optimizers`):
  parameters as ``dict[str, Tensor]``, pure optimizer steps, :func:`inner_loop`;
- a ``higher``-compatible layer on top (``innerloop_ctx``, ``monkeypatch`` in
  :mod:`metarun.unroll.patch`, ``DifferentiableOptimizer``... in :mod:`metarun.unroll.diffopt`,
  re-exported under higher's name :mod:`metarun.unroll.optim`), so
  ``import metarun.unroll as higher`` runs higher scripts.

One registry (:data:`metarun.unroll.optimizers.REGISTRY`) maps ``torch.optim`` types to both
layers' classes; :func:`register_functional` fills it, higher's :func:`register_optim` is a thin
name over it.

This package imports torch only (never Hydra or the runner).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from metarun.unroll import diffopt, implicit, optim, optimizers, patch, utils
from metarun.unroll.diffopt import (
    DifferentiableOptimizer,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
)
from metarun.unroll.functional import (
    GradBackend,
    InnerLoopResult,
    detach_params,
    functional_call,
    get_buffers,
    get_params,
    grads_of,
    inner_loop,
    inner_step,
)
from metarun.unroll.implicit import (
    CG,
    ImplicitGrad,
    ImplicitSolverError,
    Neumann,
    SolverInfo,
    check_converged,
    implicit_grad,
    implicit_surrogate,
    stationarity_of,
)
from metarun.unroll.optimizers import (
    ASGD,
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    FunctionalOptimizer,
    NAdam,
    Params,
    RAdam,
    RMSprop,
    Rprop,
    State,
    functional_for,
    register_functional,
    safe_sqrt,
)
from metarun.unroll.patch import (
    BufferPolicy,
    FunctionalModule,
    HistoryError,
    make_functional,
    monkeypatch,
)

__all__ = [
    "ASGD",
    "CG",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "BufferPolicy",
    "DifferentiableOptimizer",
    "FunctionalModule",
    "FunctionalOptimizer",
    "GradBackend",
    "HistoryError",
    "ImplicitGrad",
    "ImplicitSolverError",
    "InnerLoopResult",
    "NAdam",
    "Neumann",
    "Params",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SolverInfo",
    "State",
    "apply_trainable_opt_params",
    "check_converged",
    "create_diff_optim",
    "detach_params",
    "diffopt",
    "functional_call",
    "functional_for",
    "get_buffers",
    "get_diff_optim",
    "get_params",
    "get_trainable_opt_params",
    "grads_of",
    "implicit",
    "implicit_grad",
    "implicit_surrogate",
    "inner_loop",
    "inner_step",
    "innerloop_ctx",
    "make_functional",
    "monkeypatch",
    "optim",
    "optimizers",
    "patch",
    "register_functional",
    "register_optim",
    "safe_sqrt",
    "stationarity_of",
    "utils",
]


@contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: diffopt.Override | None = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
    buffer_policy: BufferPolicy | str = BufferPolicy.PRIVATE,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Yields ``(fmodel, diffopt)`` for one differentiable inner loop (higher's context manager).

    Args:
        model: the user's module (not modified).
        opt: a ``torch.optim`` optimizer over ``model.parameters()``; its param groups and state
            are the starting point.
        device: move fast weights and state there.
        copy_initial_weights: see :func:`monkeypatch` (``False`` for MAML).
        override: per-group optimizer settings as (differentiable) tensors.
        track_higher_grads: ``False`` for test mode.
        first_order: first-order updates that keep the meta-gradient on the initial weights
            (metarun extension; in higher this needs hand-written code).
        buffer_policy: BatchNorm buffer handling (metarun extension, see :class:`BufferPolicy`).

    Example::

        with innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(5):
                diffopt.step(F.cross_entropy(fmodel(x_s), y_s))
            F.cross_entropy(fmodel(x_q), y_q).backward()   # model.weight.grad is set
    """
    fmodel = monkeypatch(
        model,
        device=device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        buffer_policy=buffer_policy,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        first_order=first_order,
    )
    yield fmodel, diffopt
