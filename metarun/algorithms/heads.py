"""Finding a model's head by a config key: algorithms that treat one module of a plain model
specially (ANIL adapts only it, ProtoNets drops it) name it by its ``named_modules()`` name, or
take the last ``nn.Linear`` when the key is null."""

from __future__ import annotations

from torch import nn

from metarun.spec.errors import ConfigError


def find_head(model: nn.Module, name: str | None, *, key: str, role: str) -> str:
    """The name of the module ``name`` of ``model``; ``None``: its last ``nn.Linear``.

    Args:
        model: the network.
        name: a dotted name from ``model.named_modules()``, or ``None``.
        key: the config key that chose ``name``, for messages (``"algo.head"``).
        role: what the algorithm does with the module, for messages (``"adapts"``).

    Raises:
        ConfigError: no module of that name (the message lists the model's top-level modules
            and every ``nn.Linear``), or ``None`` and the model has no ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    if name is None:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linear:
            raise ConfigError(
                f"{key}=null {role} the model's last nn.Linear, but {type(model).__name__} has "
                f"none (set {key} to one of: {listing(modules)})"
            )
        return linear[-1]
    if not name or name not in modules:
        raise ConfigError(
            f"{key} must name a module of {type(model).__name__}, got {name!r} (set e.g. "
            f"{key}={_default_hint(modules)}; modules: {listing(modules)})"
        )
    return name


def listing(modules: dict[str, nn.Module]) -> str:
    """The top-level modules and every ``nn.Linear``, with their types."""
    shown = [
        f"{n} ({type(m).__name__})"
        for n, m in modules.items()
        if n and ("." not in n or isinstance(m, nn.Linear))
    ]
    return ", ".join(shown) or "none"


def _default_hint(modules: dict[str, nn.Module]) -> str:
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else "null"
