"""Inner loops under ``torch.func.vmap``: :func:`func_inner_loop` is
:func:`metarun.unroll.inner_loop` with its gradients taken by ``torch.func``, so that a whole
batch of tasks runs as one ``torch.func.vmap`` computation, still differentiable by ordinary
autograd (the meta-gradient).

Normalisation layers keep per-task semantics: under ``vmap`` every task is its own batch, so
batch statistics are computed per task, exactly as a Python loop over tasks does. Running
statistics cannot be shared by tasks running at once, so they are switched off
(:func:`batch_stats_buffers`); policies that need them must use the loop.

One trap, found by ``tests/test_vmap.py``: in torch 2.14 the vmap rule of the native batch-norm
*double* backward is wrong (second-order MAML meta-gradients under vmap come out ~0.3-14% off,
silently; conv biases before BN get a non-zero gradient where the true one is exactly 0).
:class:`decomposed_batch_norm` routes ``F.batch_norm`` through plain mean/var ops inside the
vmapped region, which vmap and double backward handle exactly. First-order loops never take
that double backward and can keep the native kernel (15-30% faster on CPU).

Example::

    def task_loss(params, sx, sy, qx, qy):
        inner = lambda p: F.cross_entropy(functional_call(model, p, sx, buffers=off), sy)
        adapted = func_inner_loop(inner, params, SGD(lr=0.4), steps=5)
        return F.cross_entropy(functional_call(model, adapted, qx, buffers=off), qy)

    losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
    losses.mean().backward()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from metarun.unroll.functional import GradBackend, inner_loop
from metarun.unroll.optimizers import FunctionalOptimizer, Hyper, Params, State


def batch_stats_buffers(module: nn.Module) -> dict[str, Tensor | None]:
    """Buffer overrides that make every normalisation layer use batch statistics only.

    With ``running_mean``/``running_var`` substituted by ``None``, ``BatchNorm`` normalises with
    the statistics of its input in training and eval mode alike and updates nothing; this is
    what per-task statistics under ``vmap`` need (and what the MAML reference code does).
    """
    out: dict[str, Tensor | None] = {}
    for prefix, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, name, None) is not None:
                    out[f"{prefix}.{name}" if prefix else name] = None
    return out


def _batch_norm_from_ops(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if not training and running_mean is not None and running_var is not None:
        mean, var = running_mean, running_var
        shape = [1, -1] + [1] * (input.dim() - 2)
        mean, var = mean.reshape(shape), var.reshape(shape)
    else:
        if running_mean is not None or running_var is not None:
            raise ValueError(
                "batch statistics with running-statistics updates cannot run under vmap; "
                "use batch_stats_buffers() (per-task statistics, nothing written)"
            )
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, unbiased=False, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (input.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


class decomposed_batch_norm(TorchFunctionMode):  # noqa: N801 (used like a function)
    """Context manager: ``F.batch_norm`` computed from elementary ops while active.

    A scoped, thread-local torch-function mode (no patching of modules or of torch); enter it
    around the forward pass of a vmapped function. See the module docstring for why.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm_from_ops(*args, **kwargs)
        return func(*args, **kwargs)


def func_inner_loop(
    loss_fn: Callable[[Params], Tensor],
    params: Params,
    optimizer: FunctionalOptimizer,
    steps: int,
    *,
    state: State | None = None,
    hyper: Hyper | None = None,
    first_order: bool = False,
    trainable: Sequence[str] | None = None,
) -> Params:
    """``steps`` differentiable optimizer steps using ``torch.func`` (vmap-compatible).

    :func:`metarun.unroll.inner_loop` with ``grad="func"``, returning only the adapted
    parameters: the same loop, update rules and gradient-flow semantics (second order by
    default; ``first_order`` detaches the inner gradients while keeping the identity path to
    ``params``; parameters that do not require grad are left unchanged).

    Args:
        loss_fn: maps parameters to a scalar loss (one task).
        params: initial parameters (typically shared by all tasks: ``in_dims=None``).
        optimizer: update rule; ``hyper`` tensors (learned learning rates) may require grad.
        steps: number of inner steps (>= 0).
        state: initial optimizer state (``None``: fresh).
        hyper: hyperparameter overrides.
        first_order: first-order MAML.
        trainable: the names of the parameters to update (default: those that require grad;
            see :func:`metarun.unroll.inner_loop`).

    Returns:
        The adapted parameters.
    """
    return inner_loop(
        loss_fn,
        params,
        optimizer,
        steps,
        state=state,
        hyper=hyper,
        first_order=first_order,
        grad=GradBackend.func,
        trainable=trainable,
    ).params
