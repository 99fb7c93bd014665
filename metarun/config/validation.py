"""Composed config -> validated :class:`RunConfig`, and back to / from checkpoint YAML."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from metarun import registry
from metarun.config.schema import RunConfig
from metarun.registry import GROUPS
from metarun.spec.bases import check_fits
from metarun.spec.errors import ConfigError


def validate(cfg: DictConfig) -> RunConfig:
    """Resolve ``cfg`` and run every schema's semantic checks (their ``__post_init__``).

    Args:
        cfg: a config composed by Hydra from ``conf/`` (the ``hydra`` node, if any, is ignored).

    Returns:
        The typed, resolved configuration.

    Raises:
        ConfigError: a missing or unresolvable value, a key that no schema declares (added with
            Hydra's ``+``), or a failed semantic check. The message names the full key and the
            value.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    for group in GROUPS:
        if OmegaConf.is_missing(cfg, group):
            raise ConfigError(f"{group} must be chosen, got nothing (set e.g. {group}=...)")
    check_known_keys(cfg)
    algo, dataset, model = (OmegaConf.get_type(cfg[group]) for group in GROUPS)
    if algo is not None and dataset is not None and model is not None:
        # Before values are resolved: a conv4 model on sinusoid would otherwise fail as an
        # unresolvable ${dataset.n_way}.
        check_fits(algo, dataset, model)
    try:
        run = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        raise ConfigError(
            f"{error.full_key} must be set, got ??? (set e.g. {error.full_key}=...)"
        ) from None
    except OmegaConfBaseException as error:
        # Interpolations are resolved here, not at compose time: a missing key or env variable,
        # or an interpolated value of the wrong type.
        raise ConfigError(f"{error.full_key}: {error.msg}") from None
    if not isinstance(run, RunConfig):
        raise ConfigError(f"the primary config must use the run_schema, got {type(run).__name__}")
    return run


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Every key of a schema-backed node is a field of its schema.

    Hydra's ``+key=value`` (and ``++``) opens a structured config to add the key, so a typo such
    as ``+algo.inner_lrr=0.1`` (Hydra's own hint after ``algo.inner_lrr=0.1`` fails) reaches
    this point; ``OmegaConf.to_object`` would then set it as a stray attribute and the run would
    ignore it. Only nodes typed by a dataclass are checked: a dict-typed field would stay
    free-form (no schema has one today); ``hydra.*`` is Hydra's and was removed before.

    Raises:
        ConfigError: naming the full key, its value and the nearest valid key.
    """
    schema = OmegaConf.get_type(cfg)
    fields = (
        [f.name for f in dataclasses.fields(schema)]
        if isinstance(schema, type) and dataclasses.is_dataclass(schema)
        else None
    )
    for key, value in cfg.items_ex(resolve=False):
        name = str(key)
        if fields is not None and name not in fields:
            raise ConfigError(_unknown_key_message(prefix, name, value, fields, schema))
        if isinstance(value, DictConfig) and not (value._is_missing() or value._is_none()):
            check_known_keys(value, f"{prefix}{name}.")


def _unknown_key_message(
    prefix: str, name: str, value: Any, fields: list[str], schema: type | None
) -> str:
    where = prefix.rstrip(".") or "the run config"
    group = prefix.rstrip(".")
    if group in GROUPS and schema is not None:
        try:
            where = f"{group}={registry.option_of(group, schema).name}"
        except ConfigError:  # a schema registered by no option: name the node alone
            pass
    shown = "" if isinstance(value, DictConfig) else f"={value}"
    near = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    fix = f"did you mean {prefix}{near[0]}{shown}?" if near else f"its keys: {', '.join(fields)}"
    return (
        f"{prefix}{name}{shown}: {where} has no key {name!r}; {fix} (a leading + or ++ cannot "
        "add a key to a schema, the run would ignore it; `metarun --cfg job` shows every key)"
    )


def to_yaml(run: RunConfig) -> str:
    """The resolved configuration as YAML (what checkpoints and ``results.json`` carry)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def options(run: RunConfig) -> dict[str, str]:
    """The chosen option of each group, e.g. ``{"algo": "maml", ...}`` (checkpoints keep it so
    :func:`from_yaml` can re-type the saved YAML without Hydra)."""
    chosen = {group: registry.option_of(group, getattr(run, group)).name for group in GROUPS}
    if run.test_dataset is not None:
        chosen["test_dataset"] = registry.option_of("dataset", run.test_dataset).name
    return chosen


def from_yaml(text: str, chosen: dict[str, str]) -> RunConfig:
    """Re-type and re-validate a config saved by :func:`to_yaml`.

    Args:
        text: the YAML.
        chosen: the option of each group, as returned by :func:`options`.

    Raises:
        ConfigError: an unknown option, or a saved value the current schemas reject.
    """
    schema = OmegaConf.structured(RunConfig)
    for group in GROUPS:
        option = chosen.get(group)
        known = registry.options(group)
        if option not in known:
            raise ConfigError(f"{group}={option!r} in the checkpoint is not one of {sorted(known)}")
        schema[group] = OmegaConf.structured(known[option].schema)
    test_option = chosen.get("test_dataset")
    if test_option is not None:
        known = registry.options("dataset")
        if test_option not in known:
            raise ConfigError(
                f"test_dataset={test_option!r} in the checkpoint is not one of {sorted(known)}"
            )
        schema["test_dataset"] = OmegaConf.structured(known[test_option].schema)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(text))
    except OmegaConfBaseException as error:
        raise ConfigError(f"saved config does not match the schema: {error}") from None
    return validate(merged)  # type: ignore[arg-type]  # merging DictConfigs gives a DictConfig
