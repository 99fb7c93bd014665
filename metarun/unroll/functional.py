"""The functional layer: parameters as dicts, a stateless forward, and differentiable inner loops.

Everything the algorithms use lives here; the ``higher``-compatible objects in
:mod:`metarun.unroll.patch` and :mod:`metarun.unroll.diffopt` are built on top of it.

:func:`inner_loop` is the one inner loop of the package: the gradient engine is an argument
(``grad="autograd"``, or ``grad="func"`` for ``torch.func.vmap``, which
:func:`metarun.unroll.batched.func_inner_loop` names).

Example::

    from metarun.unroll import SGD, get_params, functional_call, inner_loop

    params = get_params(model)                       # the model's own tensors: MAML meta-grads
    loss_fn = lambda p: F.cross_entropy(functional_call(model, p, x_s), y_s)
    result = inner_loop(loss_fn, params, SGD(lr=0.4), steps=5)
    meta_loss = F.cross_entropy(functional_call(model, result.params, x_q), y_q)
    meta_loss.backward()                             # fills model.<param>.grad
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from metarun.unroll.optimizers import FunctionalOptimizer, Hyper, Params, State

LossFn = Callable[[Params], Tensor]


def get_params(
    module: nn.Module, *, copy: bool = False, device: torch.device | str | None = None
) -> Params:
    """The module's parameters keyed by ``named_parameters()`` name (tied weights appear once).

    Args:
        module: any ``nn.Module``.
        copy: ``False`` returns the module's own tensors, so gradients reach them (MAML).
            ``True`` returns ``clone().detach()`` copies that require grad as the original does
            (``copy_initial_weights=True`` in higher's terms).
        device: move the copies to this device.
    """
    out: Params = {}
    for name, p in module.named_parameters():
        if copy:
            q = p.detach().clone()
            if device is not None:
                q = q.to(device)
            out[name] = q.requires_grad_(p.requires_grad)
        else:
            out[name] = p if device is None else p.to(device)
    return out


def get_buffers(
    module: nn.Module, *, copy: bool = True, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """The module's buffers by name; ``copy=True`` gives private detached clones."""
    out: dict[str, Tensor] = {}
    for name, b in module.named_buffers():
        b = b.detach().clone() if copy else b
        out[name] = b if device is None else b.to(device)
    return out


def functional_call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    buffers: Mapping[str, Tensor | None] | None = None,
    **kwargs: Any,
) -> Any:
    """Runs the unmodified ``module`` with ``params`` (and ``buffers``) substituted.

    A wrapper of :func:`torch.func.functional_call`: hooks fire, parametrizations see the
    substituted originals, and every tie is kept: a tensor given under one of its names (the
    ``named_parameters()`` name) replaces it wherever the module holds it, whether the tie comes
    from assignment (``b.weight = a.weight``) or from reusing a module (``proj`` twice in an
    ``nn.Sequential``, one submodule held by two parents). Buffers not given are the module's own.

    Raises:
        ValueError: when two names of one tied tensor are given different values.
    """
    # None for a buffer is allowed: e.g. batch_stats_buffers() switches running statistics off.
    tensors: dict[str, Any] = {**buffers, **params} if buffers else dict(params)
    return torch.func.functional_call(
        module, _untie(module, tensors), args, kwargs, tie_weights=False, strict=False
    )


def _untie(module: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """One entry per storage slot (a submodule's ``_parameters``/``_buffers`` key) holding a
    given tensor.

    torch's own ``tie_weights=True`` expands a name to every *name* of the tensor. A reused
    module has several names for one slot, so torch swaps that slot twice and restores it in
    the wrong order: the user's module is left holding the (non-leaf) fast weights. Substituting
    each slot exactly once is correct for both kinds of tie.
    """
    slot_names: dict[tuple[int, str], str] = {}  # (id(submodule), key) -> first full name
    slots_of: dict[int, list[str]] = {}  # id(tensor) -> one name per slot holding it
    tensor_at: dict[str, int] = {}  # every full name -> id(tensor)
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for table in (sub._parameters, sub._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                tensor_at[name] = id(t)
                slot = (id(sub), key)
                if slot not in slot_names:
                    slot_names[slot] = name
                    slots_of.setdefault(id(t), []).append(name)
    out: dict[str, Any] = {}
    given_for: dict[int, tuple[str, Any]] = {}
    for name, value in tensors.items():
        tid = tensor_at.get(name)
        if tid is None:  # not a tensor of the module (strict=False passes it through)
            out[name] = value
            continue
        first = given_for.setdefault(tid, (name, value))
        if first[1] is not value:
            raise ValueError(
                f"functional_call got different values for {first[0]!r} and {name!r}, which "
                "name the same (tied) tensor of the module; give one of them"
            )
        for slot_name in slots_of[tid]:
            out[slot_name] = value
    return out


def grads_of(
    loss: Tensor, params: Mapping[str, Tensor], *, create_graph: bool
) -> dict[str, Tensor | None]:
    """Gradient of ``loss`` w.r.t. each parameter that requires grad (``None`` if unused/frozen)."""
    names = [n for n, p in params.items() if p.requires_grad]
    if not names:
        return {}
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    return dict(zip(names, grads))


def detach_params(params: Mapping[str, Tensor]) -> Params:
    """Detached leaves that require grad where the originals did."""
    return {n: p.detach().requires_grad_(p.requires_grad) for n, p in params.items()}


def detach_state(state: State) -> State:
    return {
        n: {k: v.detach() if torch.is_tensor(v) else v for k, v in s.items()}
        for n, s in state.items()
    }


class GradBackend(Enum):
    """How :func:`inner_loop` differentiates the inner loss (one loop, two gradient engines).

    - ``autograd``: ``torch.autograd.grad``; every option of :func:`inner_loop` (truncation,
      checkpointing, history, test mode).
    - ``func``: ``torch.func.grad_and_value``, so the loop runs inside ``torch.func.vmap`` (a
      batch of tasks as one computation, :mod:`metarun.unroll.batched`); the options that need
      autograd's own graph handling are refused.
    """

    autograd = "autograd"
    func = "func"


GradsAndLoss = tuple[dict[str, Tensor | None], Tensor]
GradFn = Callable[[Params, bool, bool], GradsAndLoss]
"""``(params, first_order, checkpoint) -> (grads, loss)``: one inner gradient. ``first_order``:
the gradients carry no graph (the update still depends on ``params`` through the identity)."""


def _autograd_grads(loss_fn: LossFn) -> GradFn:
    def grads(params: Params, first_order: bool, checkpoint: bool) -> GradsAndLoss:
        if first_order:
            # Loss on detached leaves: no second-order graph is built at all.
            leaves = detach_params(params)
            loss = loss_fn(leaves)
            return grads_of(loss, leaves, create_graph=False), loss
        if checkpoint:
            return _checkpointed_grads(loss_fn, params)
        loss = loss_fn(params)
        return grads_of(loss, params, create_graph=True), loss

    return grads


def _func_grads(loss_fn: LossFn, params: Params, names: Sequence[str] | None = None) -> GradFn:
    # torch.func differentiates every input regardless of requires_grad: split the frozen
    # parameters off once, so they get no gradient (and no update), as under autograd. Inside
    # vmap, tensors no longer report requires_grad after a first step: callers that loop step
    # by step there name the trainable ones (``names``).
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]
    frozen = {n: p for n, p in params.items() if n not in set(names)}

    def loss_of_trainable(trainable: Params) -> Tensor:
        return loss_fn({**frozen, **trainable})

    grad_and_value = torch.func.grad_and_value(loss_of_trainable)

    def grads(params: Params, first_order: bool, checkpoint: bool) -> GradsAndLoss:
        g, loss = grad_and_value({n: params[n] for n in names})
        if first_order:
            # Detach the result (not the inputs): the loss may close over tensors of the outer
            # graph (ANIL's features), and the first-order gradient must carry none of it.
            g = {n: t.detach() for n, t in g.items()}
        return g, loss

    return grads


@dataclass
class InnerLoopResult:
    """What :func:`inner_loop` returns.

    Attributes:
        params: adapted parameters (differentiable w.r.t. the initial ones and tensor
            hyperparameters, as the gradient-flow options allow).
        state: final optimizer state.
        losses: the inner loss before each step, detached.
        history: parameters at every time step (``history[0]`` the initial ones) when requested.
    """

    params: Params
    state: State
    losses: list[Tensor] = field(default_factory=list)
    history: list[Params] | None = None


def inner_step(
    loss_fn: LossFn,
    params: Params,
    optimizer: FunctionalOptimizer,
    state: State | None = None,
    hyper: Hyper | None = None,
    *,
    first_order: bool = False,
    track_higher_grads: bool = True,
    checkpoint: bool = False,
) -> tuple[Params, State, Tensor]:
    """One differentiable step: ``loss_fn(params)``, its gradient, an optimizer update.

    Args:
        loss_fn: maps parameters to a scalar inner loss.
        params: current parameters.
        optimizer: the update rule.
        state: optimizer state (``None``: fresh).
        hyper: hyperparameters; tensors requiring grad receive hypergradients.
        first_order: detach the inner gradient. The update ``p - lr * g`` still depends on ``p``
            through the identity, so the initial weights get the first-order MAML gradient.
            The inner loss is evaluated on detached leaves, so no second-order graph is built.
        track_higher_grads: ``False`` is test mode: the result is detached (no graph at all).
        checkpoint: recompute the inner forward during the meta-backward instead of storing its
            activations (second order only; saves memory on long unrolls).

    Returns:
        ``(new_params, new_state, loss)`` with ``loss`` detached.
    """
    return _step(
        _autograd_grads(loss_fn),
        params,
        optimizer,
        state,
        hyper,
        first_order=first_order,
        track_higher_grads=track_higher_grads,
        checkpoint=checkpoint,
    )


def _step(
    grad_fn: GradFn,
    params: Params,
    optimizer: FunctionalOptimizer,
    state: State | None,
    hyper: Hyper | None,
    *,
    first_order: bool,
    track_higher_grads: bool,
    checkpoint: bool,
) -> tuple[Params, State, Tensor]:
    """The one inner step of :func:`inner_step` and :func:`inner_loop`, whatever ``grad_fn``."""
    if not track_higher_grads:
        with torch.enable_grad():
            grads, loss = grad_fn(params, True, False)
        with torch.no_grad():
            new_params, new_state = optimizer.step(params, grads, state, hyper)
        # Results made under no_grad lose requires_grad; restore it so later steps differentiate.
        new_params = {
            n: p.detach().requires_grad_(params[n].requires_grad) for n, p in new_params.items()
        }
        return new_params, detach_state(new_state), loss.detach()
    grads, loss = grad_fn(params, first_order, checkpoint)
    new_params, new_state = optimizer.step(params, grads, state, hyper)
    return new_params, new_state, loss.detach()


def _checkpointed_grads(loss_fn: LossFn, params: Params) -> tuple[dict[str, Tensor | None], Tensor]:
    names = [n for n, p in params.items() if p.requires_grad]

    def grad_fn(*tensors: Tensor) -> tuple[Tensor, ...]:
        local = dict(params)
        local.update(zip(names, tensors))
        loss = loss_fn(local)
        grads = torch.autograd.grad(
            loss, tensors, create_graph=torch.is_grad_enabled(), allow_unused=True
        )
        out = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads))
        return (*out, loss.detach())

    outs = torch.utils.checkpoint.checkpoint(
        grad_fn, *[params[n] for n in names], use_reentrant=False
    )
    return dict(zip(names, outs[:-1])), outs[-1]


def inner_loop(
    loss_fn: LossFn,
    params: Params,
    optimizer: FunctionalOptimizer,
    steps: int,
    *,
    state: State | None = None,
    hyper: Hyper | None = None,
    first_order: bool = False,
    track_higher_grads: bool = True,
    truncate: int | None = None,
    checkpoint: bool = False,
    keep_history: bool = False,
    grad: GradBackend | str = GradBackend.autograd,
    trainable: Sequence[str] | None = None,
) -> InnerLoopResult:
    """Runs ``steps`` differentiable optimizer steps on ``loss_fn`` from ``params``.

    Args:
        loss_fn: maps parameters to a scalar inner loss (close over the module and the data;
            use :func:`functional_call` for the forward).
        params: initial parameters: :func:`get_params` ``(model)`` for MAML (gradients reach the
            model) or ``get_params(model, copy=True)`` for detached copies. Parameters that do
            not require grad are left unchanged and get no gradient.
        optimizer: e.g. ``SGD(lr=0.4)``; hyperparameters may be tensors.
        steps: number of inner steps (>= 0).
        state: initial optimizer state (``None``: fresh).
        hyper: hyperparameters overriding the optimizer's defaults for this loop; values may be
            per-parameter dicts (Meta-SGD).
        first_order: first-order MAML (see :func:`inner_step`).
        track_higher_grads: ``False`` runs without any graph (evaluation).
        truncate: keep the second-order graph through the last ``truncate`` steps only; earlier
            steps are first order, so memory grows with ``truncate``, not ``steps``, while the
            initial weights still receive a (first-order) gradient through those steps.
        checkpoint: recompute inner forwards in the backward pass instead of storing them.
        keep_history: also return every intermediate parameter dict.
        grad: the gradient engine (:class:`GradBackend`): ``"autograd"`` (default) or
            ``"func"`` (``torch.func``, to run under ``torch.func.vmap``; see
            :func:`metarun.unroll.batched.func_inner_loop`). Both give the same values and the
            same meta-gradients; ``"func"`` refuses ``truncate``, ``checkpoint``,
            ``keep_history`` and ``track_higher_grads=False``.
        trainable: with ``grad="func"``, the names of the parameters the loop updates (default:
            those that require grad). Inside ``vmap`` tensors stop reporting ``requires_grad``
            after a first step, so a loop run one step at a time there names them.

    Returns:
        An :class:`InnerLoopResult`; with ``grad="func"`` its ``history`` is ``None``, and under
        ``vmap`` its tensors are per task (return what you need from the vmapped function).

    Raises:
        ValueError: ``steps < 0``, ``truncate < 0``, an unknown ``grad``, or an option that
            ``grad="func"`` does not support.
    """
    if steps < 0:
        raise ValueError(f"inner_loop: steps must be >= 0, got {steps}")
    if truncate is not None and truncate < 0:
        raise ValueError(f"inner_loop: truncate must be >= 0 or None, got {truncate}")
    backend = _backend(grad)
    if backend is GradBackend.autograd:
        grad_fn = _autograd_grads(loss_fn)
    else:
        _refuse_under_func(
            truncate=truncate,
            checkpoint=checkpoint,
            keep_history=keep_history,
            track_higher_grads=track_higher_grads,
        )
        grad_fn = _func_grads(loss_fn, params, trainable)
    if trainable is not None and backend is GradBackend.autograd:
        raise ValueError(
            "inner_loop: trainable is for grad='func' (autograd follows requires_grad); got "
            f"trainable={list(trainable)!r} with grad='autograd'"
        )
    history = [params] if keep_history else None
    losses: list[Tensor] = []
    if state is None:
        # Fresh state for the parameters the loop updates: a frozen one has none (and may have
        # no entry in a per-parameter ``hyper``, e.g. Meta-SGD rates of trainable ones only).
        updated = set(trainable) if trainable is not None else None
        state = optimizer.init(
            {
                n: p
                for n, p in params.items()
                if (p.requires_grad if updated is None else n in updated)
            },
            hyper,
        )
    for t in range(steps):
        fo = first_order or (truncate is not None and t < steps - truncate)
        params, state, loss = _step(
            grad_fn,
            params,
            optimizer,
            state,
            hyper,
            first_order=fo,
            track_higher_grads=track_higher_grads,
            checkpoint=checkpoint,
        )
        losses.append(loss)
        if history is not None:
            history.append(params)
    return InnerLoopResult(params=params, state=state, losses=losses, history=history)


def _backend(grad: GradBackend | str) -> GradBackend:
    try:
        return GradBackend(grad)
    except ValueError:
        known = ", ".join(repr(b.value) for b in GradBackend)
        raise ValueError(f"inner_loop: grad must be one of {known}, got {grad!r}") from None


def _refuse_under_func(**options: Any) -> None:
    # checkpoint recomputes through torch.utils.checkpoint, which does not compose with torch.func
    # transforms; truncation, history and test mode are autograd-only features of this loop.
    defaults = {
        "truncate": None,
        "checkpoint": False,
        "keep_history": False,
        "track_higher_grads": True,
    }
    bad = [f"{k}={v!r}" for k, v in options.items() if v != defaults[k]]
    if bad:
        raise ValueError(
            f"inner_loop(grad='func') does not support {', '.join(bad)}; use "
            "grad='autograd' (the default, a Python loop over tasks instead of vmap) for "
            "truncate, checkpoint, keep_history and track_higher_grads=False"
        )
