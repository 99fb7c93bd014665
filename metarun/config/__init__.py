"""Configuration: typed schemas (``schema``), their ConfigStore registration (``store``) and the
checks that turn a composed config into a validated :class:`RunConfig` (``validate``)."""

from __future__ import annotations

from metarun.config.errors import ConfigError
from metarun.config.schema import (
    SCHEMAS,
    BNPolicy,
    Conv4Config,
    EvalConfig,
    FOMAMLConfig,
    InnerLR,
    LogConfig,
    MAMLConfig,
    MetaOptimizerConfig,
    MLPConfig,
    Mode,
    OmniglotConfig,
    OmniglotSplit,
    OptimizerName,
    RunConfig,
    SaveConfig,
    SinusoidConfig,
    TaskBatching,
)
from metarun.config.validate import from_yaml, options, to_yaml, validate

__all__ = [
    "SCHEMAS",
    "BNPolicy",
    "ConfigError",
    "Conv4Config",
    "EvalConfig",
    "FOMAMLConfig",
    "InnerLR",
    "LogConfig",
    "MAMLConfig",
    "MLPConfig",
    "MetaOptimizerConfig",
    "Mode",
    "OmniglotConfig",
    "OmniglotSplit",
    "OptimizerName",
    "RunConfig",
    "SaveConfig",
    "SinusoidConfig",
    "TaskBatching",
    "from_yaml",
    "options",
    "to_yaml",
    "validate",
]
