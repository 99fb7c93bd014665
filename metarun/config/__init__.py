"""Configuration, the Hydra-facing layer: the run's schema (``schema``), the ConfigStore
registration of every schema (``store``) and the checks that turn a composed config into a
validated :class:`RunConfig` (``validation``). What options declare (errors, checks, enums,
schema bases) is in :mod:`metarun.spec`.

Schemas of algorithms, datasets and models live beside their code and register themselves in
:mod:`metarun.registry`; they are importable from here by class name too.

Names are loaded on first use, so that ``from metarun.config import ConfigError`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from metarun.spec.enums import (
    BNPolicy,
    InnerLR,
    LeNetVariant,
    MnistSourceSplit,
    Mode,
    NoiseType,
    OmniglotSplit,
    OptimizerName,
    ScheduleName,
    TaskBatching,
)
from metarun.spec.errors import ConfigError

if TYPE_CHECKING:
    from metarun.config.schema import (
        EvalConfig,
        LogConfig,
        MetaOptimizerConfig,
        RunConfig,
        SaveConfig,
    )
    from metarun.config.validation import from_yaml, options, to_yaml, validate

_LAZY = {
    "EvalConfig": "schema",
    "LogConfig": "schema",
    "MetaOptimizerConfig": "schema",
    "RunConfig": "schema",
    "SaveConfig": "schema",
    "from_yaml": "validation",
    "options": "validation",
    "to_yaml": "validation",
    "validate": "validation",
}

__all__ = [
    "BNPolicy",
    "ConfigError",
    "EvalConfig",
    "InnerLR",
    "LeNetVariant",
    "LogConfig",
    "MetaOptimizerConfig",
    "MnistSourceSplit",
    "Mode",
    "NoiseType",
    "OmniglotSplit",
    "OptimizerName",
    "RunConfig",
    "SaveConfig",
    "ScheduleName",
    "TaskBatching",
    "from_yaml",
    "options",
    "to_yaml",
    "validate",
]


def __getattr__(name: str) -> object:
    """The lazily loaded names above; every registered option's schema by class name
    (``from metarun.config import MAMLConfig``); and ``SCHEMAS``: ``{group: {option: schema}}``."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"metarun.config.{_LAZY[name]}"), name)
    from metarun import registry

    if name == "SCHEMAS":
        return {
            group: {n: o.schema for n, o in registry.options(group).items()}
            for group in registry.GROUPS
        }
    for group in registry.GROUPS:
        for option in registry.options(group).values():
            if option.schema.__name__ == name:
                return option.schema
    raise AttributeError(f"module 'metarun.config' has no attribute {name!r}")
