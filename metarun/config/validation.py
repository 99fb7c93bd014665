"""Composed config -> validated :class:`RunConfig`, and back to / from checkpoint YAML."""

from __future__ import annotations

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
        ConfigError: a missing or unresolvable value, or a failed semantic check. The message
            names the full key and the value.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    for group in GROUPS:
        if OmegaConf.is_missing(cfg, group):
            raise ConfigError(f"{group} must be chosen, got nothing (set e.g. {group}=...)")
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


def to_yaml(run: RunConfig) -> str:
    """The resolved configuration as YAML (what checkpoints and ``results.json`` carry)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def options(run: RunConfig) -> dict[str, str]:
    """The chosen option of each group, e.g. ``{"algo": "maml", ...}`` (checkpoints keep it so
    :func:`from_yaml` can re-type the saved YAML without Hydra)."""
    return {group: registry.option_of(group, getattr(run, group)).name for group in GROUPS}


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
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(text))
    except OmegaConfBaseException as error:
        raise ConfigError(f"saved config does not match the schema: {error}") from None
    return validate(merged)  # type: ignore[arg-type]  # merging DictConfigs gives a DictConfig
