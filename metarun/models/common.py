"""What the model modules share: the size checks of constructors and schemas, the registered
builders' call, and the layers several networks are made of."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from metarun.spec.checks import require

M = TypeVar("M", bound=nn.Module)


def require_sizes(model: str, **sizes: int) -> None:
    """Raise ``ValueError("<model> <key> must be >= 1, got <value>")`` for the first of
    ``sizes`` (in the order given) below 1."""
    for key, value in sizes.items():
        if value < 1:
            raise ValueError(f"{model} {key} must be >= 1, got {value}")


def require_at_least(
    config: Any, key: str, minimum: int, example: object, requirement: str = ""
) -> None:
    """A schema's check that its field ``key`` is at least ``minimum``: else the
    :class:`~metarun.spec.errors.ConfigError` of :func:`~metarun.spec.checks.require`,
    ``"model.<key> must be <requirement>, got <value> (set e.g. model.<key>=<example>)"``
    (``requirement`` defaults to ``">= <minimum>"``)."""
    value = getattr(config, key)
    requirement = requirement or f">= {minimum}"
    require(value >= minimum, f"model.{key}", value, requirement, f"model.{key}={example}")


def call_with_fields(factory: Callable[..., M], config: Any, **convert: Callable[[Any], Any]) -> M:
    """``factory(**fields)``: every field of the schema instance ``config`` by name (a model
    schema's fields are its constructor's keyword arguments), each one named in ``convert``
    passed through its converter first (e.g. ``widths=tuple``)."""
    kwargs = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    for key, converter in convert.items():
        kwargs[key] = converter(kwargs[key])
    return factory(**kwargs)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 'same' convolution without bias (a batch norm follows it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def linear_stack(sizes: Sequence[int]) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` through ``sizes`` (at least two): no activation on
    the output."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
