"""``higher``-compatible differentiable optimizers (higher's ``higher.optim``), built on the
pure update rules of :mod:`metarun.unroll.optimizers`.

``DifferentiableOptimizer(other, reference_params, fmodel=...)`` starts from a ``torch.optim``
optimizer's param groups and existing state and updates fast weights differentiably on each
``step(loss)``. Which class serves which ``torch.optim`` type is looked up in the one registry,
:data:`metarun.unroll.optimizers.REGISTRY`; :func:`register_optim` (higher's name) registers
into it. higher's module name keeps working: :mod:`metarun.unroll.optim` re-exports this one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metarun.unroll import optimizers as F
from metarun.unroll import utils
from metarun.unroll.functional import detach_state
from metarun.unroll.patch import FunctionalModule

Override = Mapping[str, Any]
"""Setting name -> values with a length of 1 or one per param group (see :func:`per_group`)."""
GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]


class DifferentiableOptimizer:
    """Differentiable counterpart of a ``torch.optim`` optimizer (higher's semantics).

    Args:
        other: the ``torch.optim`` optimizer whose param groups and state are the starting point.
        reference_params: the original module's parameters (``model.parameters()``); the
            optimizer's parameters are located in it by identity.
        fmodel: fast model to update on each step (its fast weights are used when ``step`` gets
            no ``params``).
        device: move optimizer state there.
        override: per-group settings as tensors, ``{"lr": [t]}`` (one value for all groups) or
            ``{"lr": [t0, t1, ...]}`` (one per group); any numeric setting may require grad.
        grad_callback: applied to the list of gradients (reference order) before each update.
        track_higher_grads: ``False`` is test mode: detached results, no graph.
        first_order: detach inner gradients (first-order MAML); unlike ``track_higher_grads=False``
            the new weights stay connected to the old ones, so the initial weights still receive a
            meta-gradient.

    Raises:
        TypeError: when ``other`` has no differentiable version.
        ValueError: when an optimizer parameter is not among ``reference_params``, or an
            override list has the wrong length.
    """

    functional_class: type[F.FunctionalOptimizer] | None = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: FunctionalModule | None = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        cls = self.functional_class or F.functional_for(other)
        reference = list(reference_params)
        index_of = {id(p): i for i, p in enumerate(reference)}
        self._functional = cls()
        self.param_groups: list[dict[str, Any]] = []
        self._group_to_param_list: list[list[int]] = []
        self.state: dict[int, F.ParamState] = {}
        for g_idx, group in enumerate(other.param_groups):
            indices = []
            for p in group["params"]:
                i = index_of.get(id(p))
                if i is None:
                    raise ValueError(
                        f"parameter of shape {tuple(p.shape)} in param group {g_idx} of the "
                        f"{type(other).__name__} optimizer was not found among the reference "
                        "parameters; build the optimizer on model.parameters() of the model "
                        "given to innerloop_ctx/monkeypatch"
                    )
                indices.append(i)
                if p in other.state and other.state[p]:
                    self.state[i] = self._functional.state_from_torch(other.state[p], p)
                    if device is not None:
                        self.state[i] = {
                            k: v.to(device) if torch.is_tensor(v) else v
                            for k, v in self.state[i].items()
                        }
            settings = {
                k: copy.deepcopy(v)
                for k, v in group.items()
                if k != "params" and k in self._functional.defaults
            }
            self.param_groups.append({**self._functional.defaults, **settings})
            self._group_to_param_list.append(indices)
        if override is not None:
            self._apply_override(override)
        self._fmodel = fmodel
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads
        self._first_order = first_order

    def _apply_override(self, override: Override) -> None:
        n = len(self.param_groups)
        for key, values in override.items():
            if key not in self._functional.defaults:
                raise ValueError(
                    f"override key {key!r} is not a setting of {self._functional.name}; "
                    f"settings: {sorted(self._functional.defaults)}"
                )
            for g_idx, value in enumerate(per_group(key, values, n)):
                self.param_groups[g_idx][key] = value

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        first_order: bool | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Differentiable replacement of ``zero_grad(); loss.backward(); step()``.

        Args:
            loss: the inner loss at the current fast weights.
            params: weights to differentiate and update (default: the fast model's latest).
            override: settings for this and later steps (see the constructor).
            grad_callback: overrides the constructor's callback for this step.
            first_order: overrides the constructor's ``first_order`` for this step (e.g. make
                all but the last few steps first order: a truncated unroll).

        Returns:
            The new weights in reference order; the fast model (if any) is updated with them.
        """
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None:
                raise ValueError(
                    "step() needs params= when the differentiable optimizer has no fast model"
                )
            params = self._fmodel.fast_params
        params = list(params)
        fo = self._first_order if first_order is None else first_order
        track = self._track_higher_grads
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        if wanted:
            found = torch.autograd.grad(
                loss,
                [params[i] for i in wanted],
                create_graph=track and not fo,
                allow_unused=True,
            )
            for i, g in zip(wanted, found):
                grads[i] = g
        callback = grad_callback or self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
        if fo and track:
            grads = [None if g is None else g.detach() for g in grads]
        new_params = list(params)
        with torch.set_grad_enabled(track and torch.is_grad_enabled()):
            for group, indices in zip(self.param_groups, self._group_to_param_list):
                for i in indices:
                    grad = grads[i]
                    if grad is None:
                        continue
                    s = self.state.get(i)
                    if s is None:
                        s = self._functional.init_param(params[i], group)
                    new_params[i], self.state[i] = self._functional.update_param(
                        params[i], grad, s, group
                    )
        if not track:
            new_params = [
                p.detach().requires_grad_(p.requires_grad or grads[i] is not None)
                for i, p in enumerate(new_params)
            ]
            self.state = {i: detach_state({"s": s})["s"] for i, s in self.state.items()}
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params


def per_group(key: str, values: Any, n_groups: int) -> list[Any]:
    """One value per param group from an override entry, as higher reads it.

    ``values`` is anything with a length of 1 (one value for every group) or ``n_groups`` (one
    per group) that can be indexed: a list or tuple of numbers/tensors/tuples, or a tensor such
    as ``torch.tensor([0.1], requires_grad=True)`` (its elements, still in the graph).

    Raises:
        ValueError: naming ``key``, when ``values`` has no length or the wrong one.
    """
    # A str has a length but is never a setting; a 0-d tensor or a number has none.
    length = None if isinstance(values, (str, bytes)) else _len_or_none(values)
    if length is None:
        raise ValueError(
            f"override[{key!r}] must be a sequence of values (one for all groups or one per "
            f"group), got {type(values).__name__} {values!r}; e.g. override={{'{key}': [value]}}"
        )
    if length not in (1, n_groups):
        raise ValueError(
            f"override[{key!r}] has {length} values but the optimizer has {n_groups} "
            "param group(s); give 1 (for all) or one per group"
        )
    return [values[0] if length == 1 else values[i] for i in range(n_groups)]


def _len_or_none(values: Any) -> int | None:
    try:
        return len(values)
    except TypeError:  # no __len__, or a 0-d tensor
        return None


_generated: dict[type[F.FunctionalOptimizer], type[DifferentiableOptimizer]] = {}
"""A memo of :func:`differentiable_class` (not a registry: nothing registers here)."""


def differentiable_class(functional: type[F.FunctionalOptimizer]) -> type[DifferentiableOptimizer]:
    """The generic higher-compatible class over a functional rule, made once per rule (so
    ``get_diff_optim`` always returns e.g. :class:`DifferentiableSGD` for ``torch.optim.SGD``)."""
    cls = _generated.get(functional)
    if cls is not None:
        return cls
    name = "Differentiable" + functional.name
    cls = type(
        name,
        (DifferentiableOptimizer,),
        {
            "functional_class": functional,
            "__doc__": f"Differentiable ``torch.optim.{functional.name}`` (higher-compatible).",
            "__module__": __name__,
        },
    )
    _generated[functional] = cls
    return cls


DifferentiableSGD = differentiable_class(F.SGD)
DifferentiableAdam = differentiable_class(F.Adam)
DifferentiableAdamW = differentiable_class(F.AdamW)
DifferentiableRMSprop = differentiable_class(F.RMSprop)
DifferentiableAdagrad = differentiable_class(F.Adagrad)
DifferentiableAdamax = differentiable_class(F.Adamax)
DifferentiableNAdam = differentiable_class(F.NAdam)
DifferentiableRAdam = differentiable_class(F.RAdam)
DifferentiableAdadelta = differentiable_class(F.Adadelta)
DifferentiableASGD = differentiable_class(F.ASGD)
DifferentiableRprop = differentiable_class(F.Rprop)


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Registers a differentiable optimizer class for a ``torch.optim`` type (higher's API).

    ``get_diff_optim`` / ``create_diff_optim`` then build ``diff_optim_type`` for optimizers of
    exactly ``optim_type``, and :func:`metarun.unroll.functional_for` gives its update rule. A
    thin name over :func:`metarun.unroll.register_functional`: one registry serves both layers.

    Args:
        optim_type: a ``torch.optim.Optimizer`` subclass.
        diff_optim_type: a :class:`DifferentiableOptimizer` subclass; its ``functional_class``
            (or, where it has none, the rule registered for ``optim_type`` or its nearest
            registered base class) is the update rule.

    Raises:
        TypeError: when ``diff_optim_type`` is not a ``DifferentiableOptimizer`` subclass or no
            update rule can be found for it.
    """
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"register_optim: diff_optim_type must be a DifferentiableOptimizer subclass, got "
            f"{diff_optim_type!r}"
        )
    functional = diff_optim_type.functional_class or F.functional_for(optim_type)
    F.register_functional(optim_type, functional, differentiable=diff_optim_type)


def _lookup(optim_type: type) -> type[DifferentiableOptimizer]:
    # Exact type only, as higher: a subclass may change the update rule.
    entry = F.registration_for(optim_type, exact=True)
    return entry.differentiable or differentiable_class(entry.functional)


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: FunctionalModule | None = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of an existing optimizer instance (higher's API)."""
    return _lookup(type(opt))(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Tensor] | None = None,
    fmodel: FunctionalModule | None = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Builds a differentiable optimizer from a type and settings (higher's API).

    ``params`` (or the fast model's latest weights) define the parameters; a throwaway
    ``torch.optim`` instance over detached copies supplies the param groups.
    """
    if params is None:
        if fmodel is None:
            raise ValueError("create_diff_optim needs params= or fmodel=")
        params = fmodel.fast_params
    params = list(params)
    dummies = [torch.empty_like(p, device="meta").requires_grad_() for p in params]
    opt = opt_type(dummies, **(opt_kwargs or {}))
    return _lookup(opt_type)(
        opt,
        dummies,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """An ``override`` dict of leaf tensors requiring grad, initialised from ``opt``'s settings.

    Every numeric setting of every param group (a number, a tensor, or a tuple/list of those
    such as ``betas``) becomes a tensor with one entry per group, ready to be learned:
    ``get_diff_optim(opt, ..., override=hp)`` then ``meta_opt = torch.optim.Adam(flatten(hp))``.
    Flags (bools) and ``None`` are left out: they are switches, not hyperparameters. When ``opt``
    has a differentiable version, only the settings it reads are included, so the result is
    always accepted as its ``override``.

    Args:
        opt: a ``torch.optim`` optimizer.
        device: where the tensors live (default: the device of the group's first parameter).

    Returns:
        ``{setting: [value for group 0, value for group 1, ...]}``.
    """
    try:
        known: set[str] | None = set(F.functional_for(opt)().defaults)
    except TypeError:  # no differentiable version: offer every numeric setting
        known = None
    override: dict[str, list[Any]] = {}
    for group in opt.param_groups:
        first = next(iter(group["params"]), None)
        # float64 models get float64 hyperparameters (no rounding of e.g. eps or betas).
        dtype = first.dtype if first is not None and first.is_floating_point() else None
        where = device if device is not None else (first.device if first is not None else None)

        def leaf(x: Any, dtype: torch.dtype | None = dtype, where: Any = where) -> Tensor:
            if torch.is_tensor(x):
                return x.detach().clone().to(device=where).requires_grad_()
            return torch.tensor(float(x), dtype=dtype, device=where, requires_grad=True)

        for key, value in group.items():
            if key == "params" or (known is not None and key not in known):
                continue
            if _is_numeric(value):
                override.setdefault(key, []).append(utils._recursive_map(value, leaf))
    return override


def _is_numeric(value: Any) -> bool:
    leaves = utils.flatten(value)
    return bool(leaves) and all(
        torch.is_tensor(x) or (isinstance(x, (int, float)) and not isinstance(x, bool))
        for x in leaves
    )


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Override) -> None:
    """Writes learned hyperparameters back into ``opt``'s param groups, in place.

    Each value keeps the type the group had: a float stays a float, an int an int, a tuple a
    tuple, and a tensor setting is overwritten in place (no graph is recorded).

    Args:
        opt: the optimizer to update.
        override: as from :func:`get_trainable_opt_params` (1 value or one per group per key).

    Raises:
        ValueError: for a wrong number of values, or a structure that does not match the
            group's setting.
    """
    n = len(opt.param_groups)
    for key, values in override.items():
        for g_idx, value in enumerate(per_group(key, values, n)):
            group = opt.param_groups[g_idx]
            if key not in group:
                raise ValueError(
                    f"param group {g_idx} of {type(opt).__name__} has no setting {key!r}; "
                    f"settings: {sorted(k for k in group if k != 'params')}"
                )
            group[key] = _write_back(value, group[key], f"{key} (group {g_idx})")


def _write_back(value: Any, target: Any, where: str) -> Any:
    if isinstance(target, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(target):
            raise ValueError(
                f"override for {where} must be a sequence of {len(target)} values like "
                f"{target!r}, got {value!r}"
            )
        return type(target)(
            _write_back(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, target))
        )
    if torch.is_tensor(target):
        with torch.no_grad():
            target.copy_(torch.as_tensor(value, dtype=target.dtype, device=target.device))
        return target
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"{where} is {target!r}, not a number: it cannot be learned")
    number = value.item() if torch.is_tensor(value) else value
    return type(target)(number)
