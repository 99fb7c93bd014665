"""The resume policy: when a run continues from the checkpoint in its run dir, whether that
checkpoint holds the same experiment, and the config a checkpoint is evaluated or loaded with.

- ``resume=true``: continue from ``<run_dir>/checkpoints/last.pt`` (warn about changed keys);
- ``auto_resume`` (sweep jobs): continue only if the checkpoint has the same config, keys that
  may change on resume aside (:data:`RESUMABLE_CHANGES`);
- neither: an existing checkpoint is an error rather than silently overwritten.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from metarun.config import ConfigError, RunConfig, from_yaml, options, to_yaml, validate
from metarun.runner.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    load_checkpoint,
    load_latest,
    previous_path,
)
from metarun.runner.logging import flatten
from metarun.runner.trainer import Trainer

logger = logging.getLogger(__name__)

# Keys that may change when a run is resumed without being a different experiment.
RESUMABLE_CHANGES = (
    "outer_steps",
    "resume",
    "log.",
    "save.",
    "eval.",
    "device",
    "name",
    "prefetch",
    "max_nonfinite_steps",
)
GROUPS = ("algo", "dataset", "model")


def resume_state(
    config: RunConfig, run_dir: Path, *, auto_resume: bool = False
) -> tuple[dict[str, Any] | None, Path]:
    """The checkpoint a training run continues from, if any.

    Returns:
        ``(state, path)``: the checkpoint's contents (``None``: start from step 0) and the file
        they were read from (``last.pt``, or the previous checkpoint if ``last.pt`` is
        unreadable).

    Raises:
        ConfigError: a checkpoint is there but neither ``config.resume`` nor ``auto_resume`` is
            set; it is unreadable; it holds another experiment (other options, or under
            ``auto_resume`` another config).
    """
    last = run_dir / CHECKPOINT_DIR / LAST
    state = None
    resumed_from = last
    # Only the previous checkpoint: a crash between the two renames of a save (no hard links).
    if last.exists() or previous_path(last).exists():
        if not (config.resume or auto_resume):
            raise ConfigError(
                f"resume must be true to continue the run in {run_dir} (it holds {last}), got "
                "False (set resume=true, or choose a new hydra.run.dir)"
            )
        try:
            state, resumed_from = load_latest(last)
        except ValueError as error:
            raise ConfigError(f"resume: {error}") from None
        check_same_options(state, config, resumed_from, run_dir)
        if config.resume:
            _warn_config_changes(state["config"], to_yaml(config))
        elif changed := config_changes(state["config"], to_yaml(config)):
            raise ConfigError(
                f"the run dir {run_dir} holds a checkpoint of another experiment ({last} "
                f"differs in: {', '.join(changed)}); a sweep job continues only its own run "
                "(choose a new hydra.sweep.dir)"
            )
        else:
            logger.info("continuing the run in %s from %s", run_dir, last)
    elif config.resume:
        logger.warning("resume=true but %s does not exist: starting from step 0", last)
    return state, resumed_from


def restore_trainer(
    trainer: Trainer,
    state: dict[str, Any],
    config: RunConfig,
    resumed_from: Path,
    run_dir: Path,
) -> None:
    """Load ``state`` into ``trainer``; a checkpoint that does not fit the config is a
    ConfigError naming the keys that differ."""
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        # Tensor shapes or optimizer groups that differ: a model-size or dataset key
        # changed (e.g. dataset.n_way, model.hidden_sizes).
        changed = config_changes(state["config"], to_yaml(config))
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"resume: the checkpoint {resumed_from} of the run in {run_dir} does not fit "
            f"this config (it differs in: {', '.join(changed) or 'nothing visible'}; "
            f"{type(error).__name__}: {detail[:200]}); resume with the checkpoint's "
            "values, or choose a new hydra.run.dir"
        ) from None
    # Fell back to the previous checkpoint: the next save keeps it, not the unreadable one.
    trainer.rotate_last = resumed_from == run_dir / CHECKPOINT_DIR / LAST
    logger.info("resumed %s at step %d", resumed_from, trainer.step)


def extra_state(state: dict[str, Any]) -> dict[str, Any] | None:
    """The algorithm's extra state in a checkpoint (older checkpoints: MAML's task batching
    under its own key)."""
    if "algorithm_extra" in state:
        return cast("dict[str, Any] | None", state["algorithm_extra"])
    if state.get("task_batching") is not None:
        return {"task_batching": state["task_batching"]}
    return None


def check_same_options(state: dict[str, Any], config: RunConfig, path: Path, run_dir: Path) -> None:
    """Resuming with another algorithm, dataset or model is another experiment: refuse, naming
    the options that differ."""
    now = options(config)
    saved = state.get("options", {})
    differ = [g for g in GROUPS if saved.get(g) != now.get(g)]
    if differ:
        theirs = " ".join(f"{g}={saved.get(g)}" for g in differ)
        ours = " ".join(f"{g}={now.get(g)}" for g in differ)
        raise ConfigError(
            f"resume: the run in {run_dir} is another experiment: its checkpoint {path} has "
            f"{theirs}, this command {ours} (resume with {theirs}, or choose a new "
            "hydra.run.dir)"
        )


def load_user_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """:func:`load_checkpoint` for a file the user pointed at: a bad file is a ConfigError."""
    try:
        return load_checkpoint(path)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None


def resume_command(overrides: Sequence[str], run_dir: str | Path) -> str:
    """The command that continues this run: same overrides, ``resume=true``, same run dir."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    args = [*kept, "resume=true", f"hydra.run.dir={Path(run_dir)}"]
    return " ".join(["metarun", *(shlex.quote(a) for a in args)])


def config_changes(saved_yaml: str, current_yaml: str) -> list[str]:
    """Keys whose values differ, except those a resumed run may change (``outer_steps``, ...)."""

    def flat(text: str) -> dict[str, Any]:
        return flatten(cast(dict[str, Any], OmegaConf.to_container(OmegaConf.create(text))))

    saved, current = flat(saved_yaml), flat(current_yaml)
    return sorted(
        key
        for key in saved.keys() | current.keys()
        if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )


def _warn_config_changes(saved_yaml: str, current_yaml: str) -> None:
    changed = config_changes(saved_yaml, current_yaml)
    if changed:
        logger.warning(
            "resuming with a config that differs from the checkpoint's in: %s "
            "(the run continues with the new values)",
            ", ".join(changed),
        )


def checkpoint_config(
    state: dict[str, Any], *, current: RunConfig | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The config saved in a checkpoint, with the evaluation settings of ``current``.

    Raises:
        ConfigError: ``overrides`` pick another option of a group than the checkpoint used.
    """
    saved = OmegaConf.structured(from_yaml(state["config"], state["options"]))
    if current is not None:
        now = OmegaConf.structured(current)
        for key in ("eval", "seed", "device", "log", "name", "mode", "checkpoint"):
            saved[key] = now[key]
        for override in overrides:
            key, _, value = override.lstrip("+~").partition("=")
            if key in GROUPS and value != state["options"].get(key):
                raise ConfigError(
                    f"{key}={value} differs from the checkpoint's {key}="
                    f"{state['options'].get(key)} (drop the override: mode=eval uses the "
                    f"checkpoint's {key})"
                )
            if key.split(".", 1)[0] in GROUPS and "." in key:
                OmegaConf.update(saved, key, OmegaConf.select(now, key), merge=False)
    return validate(saved)
