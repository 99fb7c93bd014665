"""Helpers of higher's ``higher.utils`` module, for scripts that call them directly.

metarun's own code works on ``dict[str, Tensor]`` (see :mod:`metarun.unroll.functional`); these
functions keep higher's list-based signatures so that ``higher.utils.<name>`` keeps working after
``import metarun.unroll as higher``. The underscore names are private in higher too, but its
tests and some user code call them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "_copy_tensor",
    "_find_param_in_list",
    "_get_param_mapping",
    "_is_container",
    "_recursive_copy_and_cast",
    "_recursive_map",
    "flatten",
    "get_func_params",
]

_CONTAINERS = (list, tuple, dict, set)


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """A detached tensor that requires grad where ``t`` does.

    Args:
        t: the tensor to copy.
        safe_copy: ``True`` clones the storage; ``False`` shares it (a detached view).
        device: move the result there.
    """
    out = t.detach().clone() if safe_copy else t.detach()
    out.requires_grad_(t.requires_grad)
    return out if device is None else out.to(device)


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set (the structures the helpers recurse)."""
    return isinstance(target, _CONTAINERS)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Applies ``map_fn`` to every leaf of nested lists/tuples/dicts/sets, keeping the
    structure and the container types (dict values are mapped; keys are kept)."""
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """``target`` with every tensor leaf replaced by a detached clone on ``device``."""

    def copy_leaf(x: Any) -> Any:
        return _copy_tensor(x, True, device=device) if torch.is_tensor(x) else x

    return _recursive_map(target, copy_leaf)


def _find_param_in_list(param: Tensor, candidates: Iterable[Tensor]) -> int | None:
    """Index of ``param`` in ``candidates`` by identity (``==`` would compare values)."""
    return next((i for i, c in enumerate(candidates) if c is param), None)


def _get_param_mapping(module: nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """Maps every parameter *occurrence* to its index among the distinct parameters.

    Walks ``module`` in ``named_modules`` pre-order without removing duplicates, so a module
    used twice (or a tensor tied by assignment) contributes one entry per occurrence. Each entry
    of ``mapping`` is an index into ``seen``, which collects the distinct tensors in
    ``module.parameters()`` order. Both lists are extended in place; ``mapping`` is returned.
    """
    for _, sub in module.named_modules(remove_duplicate=False):
        for p in sub._parameters.values():
            if p is None:
                continue
            index = _find_param_in_list(p, seen)
            if index is None:
                index = len(seen)
                seen.append(p)
            mapping.append(index)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of nested lists/tuples/sets/dicts (dict values, in order) as one flat list."""
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, (list, tuple, set)):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()`` (tied weights once), requiring grad as the
    originals do: higher's initial fast weights for ``copy_initial_weights=True``.

    Args:
        module: any ``nn.Module``.
        device: move the copies there.
        safe_copy: ``False`` shares storage with the module instead of cloning.
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
