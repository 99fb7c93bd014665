"""Registers the schemas in Hydra's ConfigStore, where the YAML files under ``conf/`` find them."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from metarun.config.schema import SCHEMAS, RunConfig

#: ``conf/config.yaml`` starts its defaults list with this name.
RUN_SCHEMA = "run_schema"


def schema_path(group: str, option: str) -> str:
    """Where the schema of ``group=option`` is stored: ``schema/<group>/<option>``. A YAML option
    ``conf/<group>/<option>.yaml`` lists it first as ``/schema/<group>/<option>@_here_``."""
    return f"schema/{group}/{option}"


def register_configs() -> None:
    """Store every schema (idempotent: storing again replaces the same node)."""
    store = ConfigStore.instance()
    store.store(name=RUN_SCHEMA, node=RunConfig)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=f"schema/{group}", name=option, node=schema)
