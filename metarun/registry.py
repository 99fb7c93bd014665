"""The one registry of config-group options: every algorithm, dataset and model registers itself
here, beside its class, with its schema and its builder.

An option is one place::

    @dataclass
    class ANILConfig(MAMLConfig):          # the schema: conf/algo/anil.yaml is merged onto it
        head: str = "classifier"

    @register("algo", "anil", ANILConfig)
    class ANIL(MAML):                      # the builder: Option.build(config, ...) makes one
        @classmethod
        def from_config(cls, config, model, context): ...

What each group's builder takes (the runner calls nothing else):

- ``model``: ``build(config) -> nn.Module``;
- ``dataset``: ``build(config) -> TaskSources``;
- ``algo``: ``build(config, model, context) -> MetaAlgorithm`` (``context``:
  :class:`BuildContext`).

A class is registered through its ``from_config`` classmethod, a function as it is.
Compatibility between groups is declared by the schemas themselves
(:class:`metarun.spec.bases.AlgoSchema`, ``DatasetSchema``, ``ModelSchema``); the
registry only finds options.

The modules that register options are imported by :func:`load_options` (the package
``__init__`` of ``metarun.algorithms``, ``metarun.data`` and ``metarun.models`` imports each of
its option modules: adding an option is its module plus one import line there).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from metarun.spec.errors import ConfigError

GROUPS = ("algo", "dataset", "model")
#: Packages whose import registers every built-in option.
OPTION_PACKAGES = ("metarun.algorithms", "metarun.data", "metarun.models")

T = TypeVar("T", bound=Callable[..., Any])  # a class or a builder function


@dataclass(frozen=True)
class BuildContext:
    """What an algorithm's builder may know about the rest of the run.

    Attributes:
        task_type: ``"regression"`` or ``"classification"`` (from the dataset's schema).
        dataset: the dataset's validated config (read-only: e.g. a reweighting algorithm asks
            it for the class whose weight mass to log).
    """

    task_type: str
    dataset: Any


@dataclass(frozen=True)
class Option:
    """One option of a config group: ``conf/<group>/<name>.yaml`` merged onto ``schema``."""

    group: str
    name: str
    schema: type
    build: Callable[..., Any]


_OPTIONS: dict[str, dict[str, Option]] = {group: {} for group in GROUPS}


def register(group: str, name: str, schema: type) -> Callable[[T], T]:
    """Class or function decorator registering ``group=name`` with ``schema``.

    Raises:
        ValueError: an unknown group, or ``name`` or ``schema`` already taken by another option
            of the group (two options must not share a schema: checkpoints record the option
            by its schema's type).
    """
    if group not in _OPTIONS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")

    def decorate(target: T) -> T:
        build = getattr(target, "from_config", target)
        options = _OPTIONS[group]
        for other in options.values():
            same_name, same_schema = other.name == name, other.schema is schema
            if (same_name or same_schema) and other.build != build:
                what = f"name {name!r}" if same_name else f"schema {schema.__name__}"
                raise ValueError(f"{group}={other.name} already registered the {what}")
        options[name] = Option(group, name, schema, build)
        return target

    return decorate


#: Environment variable naming a user's own option modules (comma-separated, importable from
#: ``PYTHONPATH``): an algorithm, dataset or model outside this package (docs/extending.md).
PLUGINS_ENV = "METARUN_PLUGINS"


def load_options() -> None:
    """Import every module that registers a built-in option, then the modules named in
    ``$METARUN_PLUGINS`` (idempotent).

    Raises:
        ConfigError: a module named in ``$METARUN_PLUGINS`` cannot be imported.
    """
    for package in OPTION_PACKAGES:
        importlib.import_module(package)
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(
                f"{PLUGINS_ENV}: cannot import {name!r} ({error}); put the folder holding it "
                f"on PYTHONPATH, or remove it from {PLUGINS_ENV}"
            ) from None


def options(group: str) -> dict[str, Option]:
    """All options of ``group`` by name, in registration order."""
    load_options()
    return dict(_OPTIONS[group])


def get(group: str, name: str) -> Option:
    """The option ``group=name``.

    Raises:
        ConfigError: no such option (the message lists the options there are).
    """
    found = options(group).get(name)
    if found is None:
        known = ", ".join(sorted(_OPTIONS[group]))
        raise ConfigError(f"{group}={name!r} is not an option of {group} (one of: {known})")
    return found


def option_of(group: str, config: Any) -> Option:
    """The option whose schema is exactly the type of ``config`` (an instance or a type)."""
    kind = config if isinstance(config, type) else type(config)
    for option in options(group).values():
        if option.schema is kind:
            return option
    raise ConfigError(f"{group} has no registered option with schema {kind.__name__}")


def build(group: str, config: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object of ``config``, an instance of a registered schema of ``group``."""
    return option_of(group, config).build(config, *args, **kwargs)
