"""The semantic checks schemas run in ``__post_init__``; every failure names the key, the value
and a fix."""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any, TypeVar

from metarun.spec.errors import ConfigError

T = TypeVar("T")


def require(ok: bool, key: str, value: Any, requirement: str, example: str) -> None:
    """Unless ``ok``, raise :class:`ConfigError`
    ``"<key> must be <requirement>, got <value> (set e.g. <example>)"``."""
    if not ok:
        raise ConfigError(f"{key} must be {requirement}, got {value!r} (set e.g. {example})")


def require_range(key: str, value: list[float], example: str) -> None:
    require(
        len(value) == 2 and value[0] <= value[1],
        key,
        list(value),
        "[low, high] with low <= high",
        example,
    )


def require_optional_count(key: str, value: int | None, example: str) -> None:
    require(value is None or value >= 1, key, value, ">= 1 or null", example)


def require_image_model(
    model: Any, *, n_way: int, image_size: int, channels: int, colours: str
) -> None:
    """What a few-shot image dataset asks of its model: one output per way
    (``dataset.n_way``), the dataset's image side and its channels (``colours`` says which:
    e.g. ``"1 for dataset=omniglot (grayscale)"``)."""
    require(
        model.num_classes == n_way,
        "model.num_classes",
        model.num_classes,
        f"equal to dataset.n_way ({n_way})",
        "model.num_classes=${dataset.n_way}",
    )
    require(
        model.image_size == image_size,
        "model.image_size",
        model.image_size,
        f"equal to dataset.image_size ({image_size})",
        "model.image_size=${dataset.image_size}",
    )
    require(
        model.in_channels == channels,
        "model.in_channels",
        model.in_channels,
        colours,
        f"model.in_channels={channels}",
    )


def schema_from_keys(schema: type[T], keys: dict[str, Any]) -> T:
    """A schema instance from keyword arguments, as Python callers pass them: enum fields take
    their values (``task_batching="vmap"``); the schema's own checks run as for a config.

    Raises:
        TypeError: a key the schema does not have (naming the keys it has).
        ConfigError: a value its checks refuse.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise TypeError(
            f"{schema.__name__} has no key {', '.join(unknown)}; its keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(schema)
    typed = {}
    for key, value in keys.items():
        kind = hints.get(key)
        if isinstance(kind, type) and issubclass(kind, enum.Enum) and not isinstance(value, kind):
            value = kind(value)
        typed[key] = value
    return schema(**typed)


def schema_keys(config: Any) -> dict[str, Any]:
    """A schema instance's keys and values, as keyword arguments (the inverse of
    :func:`schema_from_keys`; enum values stay members, which the builders accept)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def require_inner_loop(
    inner_lr: float, inner_steps: int, eval_inner_steps: int, *, lr: str, eval_steps: str
) -> None:
    """The checks of ``algo.inner_lr`` (> 0), ``algo.inner_steps`` (>= 1) and
    ``algo.eval_inner_steps`` (>= 0); ``lr`` and ``eval_steps`` are the example values that the
    messages suggest."""
    require(inner_lr > 0, "algo.inner_lr", inner_lr, "> 0", f"algo.inner_lr={lr}")
    require(inner_steps >= 1, "algo.inner_steps", inner_steps, ">= 1", "algo.inner_steps=5")
    require(
        eval_inner_steps >= 0,
        "algo.eval_inner_steps",
        eval_inner_steps,
        ">= 0",
        f"algo.eval_inner_steps={eval_steps}",
    )


def require_fixed_ways(schema: Any, run: Any) -> None:
    """An algorithm whose model has one output per training class (a classifier head) tests on
    as many classes as it trains on: ``dataset.eval_n_way`` must equal ``dataset.n_way``."""
    from metarun import registry  # the registry imports the spec package

    train_ways, eval_ways = run.dataset.ways()
    if train_ways != eval_ways:
        name = registry.option_of("algo", schema).name
        raise ConfigError(
            f"dataset.eval_n_way must equal dataset.n_way ({train_ways}) for algo={name}, "
            f"got {eval_ways} (its model's classifier has one output per training class; "
            "leave dataset.eval_n_way unset, or use an algorithm without a classifier head "
            "such as a metric-based learner)"
        )
