"""Registers the schemas in Hydra's ConfigStore, where the YAML files under ``conf/`` find them."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from metarun import registry
from metarun.config.schema import RunConfig

#: ``conf/config.yaml`` starts its defaults list with this name.
RUN_SCHEMA = "run_schema"


def schema_path(group: str, option: str) -> str:
    """Where the schema of ``group=option`` is stored: ``schema/<group>/<option>``. A YAML option
    ``conf/<group>/<option>.yaml`` lists it first as ``/schema/<group>/<option>@_here_``."""
    return f"schema/{group}/{option}"


def run_name(mode: Any, algo: str, dataset: str) -> str:
    """``${metarun.run_name:...}`` in ``conf/config.yaml``: ``<algo>_<dataset>`` for training;
    ``eval`` when testing a checkpoint, whose algorithm and dataset come from the checkpoint, not
    from the (default) options composed on the command line."""
    return "eval" if getattr(mode, "value", mode) == "eval" else f"{algo}_{dataset}"


def register_configs() -> None:
    """Store every schema and the name resolver (idempotent: storing again replaces)."""
    OmegaConf.register_new_resolver("metarun.run_name", run_name, replace=True)
    store = ConfigStore.instance()
    store.store(name=RUN_SCHEMA, node=RunConfig)
    for group in registry.GROUPS:
        for name, option in registry.options(group).items():
            store.store(group=f"schema/{group}", name=name, node=option.schema)
