"""The resume policy: when a run continues from the checkpoint in its run dir, whether that
checkpoint holds the same experiment, and the config a checkpoint is evaluated or loaded with.

- ``resume=true``: continue from ``<run_dir>/checkpoints/last.pt`` (warn about changed keys);
- ``auto_resume`` (sweep jobs): continue only if the checkpoint has the same config, keys that
  may change on resume aside (:data:`RESUMABLE_CHANGES`);
- neither: an existing checkpoint is an error rather than silently overwritten.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Sequence
from enum import Enum
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
#: What a cross-domain test_dataset takes from the dataset a checkpoint was trained on.
TEST_DATASET_FOLLOWS = (
    "image_size", "mean", "std", "n_way", "k_shot", "k_query", "eval_n_way", "eval_k_shot",
    "eval_k_query",
)  # fmt: skip


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
    """The config saved in a checkpoint; with ``current``, as :func:`eval_config` makes it.

    Raises:
        ConfigError: see :func:`eval_config`.
    """
    if current is None:
        return from_yaml(state["config"], state["options"])
    return eval_config(state, current, overrides)[0]


#: mode=eval: run-level keys that say how to test, never what was trained; ``current`` gives them.
# save.* too: mode=eval writes no checkpoint, so a training command's save settings change
# nothing there (a pasted command keeps working).
EVAL_RUN_KEYS = ("eval", "seed", "device", "log", "save", "name", "mode", "checkpoint")
#: ``dataset.*`` keys that say where the data are, not which data.
DATA_LOCATION_KEYS = ("root", "download", "cache_dir")
#: A task-shape key as training names it -> the key that sets it for validation and test tasks.
TEST_SHAPE_KEYS = {"n_way": "eval_n_way", "k_shot": "eval_k_shot", "k_query": "eval_k_query"}
#: Groups chosen on the command line that configure Hydra only (``+search=optuna``).
_HYDRA_ONLY_GROUPS = ("search",)


def eval_config(
    state: dict[str, Any], current: RunConfig, overrides: Sequence[str]
) -> tuple[RunConfig, dict[str, Any]]:
    """``mode=eval``: the checkpoint's own config, with the evaluation's overrides.

    ``eval.*``, ``seed``, ``device``, ``log.*`` and ``name`` come from ``current`` (the command
    line, composed against the checkpoint's own options: :func:`metarun.cli.main`). Of the other
    overrides, those that change how the checkpoint is tested apply on top of its config:

    - where the data are: ``dataset.root`` / ``download`` / ``cache_dir``;
    - the test tasks' shape: ``dataset.n_way`` / ``k_shot`` / ``k_query`` apply as
      ``dataset.eval_n_way`` / ``eval_k_shot`` / ``eval_k_query`` (the trained values stay, so
      the model is built as trained), and the ``eval_*`` keys themselves;
    - test-time adaptation: the algorithm's ``eval_*`` keys (``algo.eval_inner_steps``, ...);
    - cross-domain data: ``test_dataset=...`` and its ``test_dataset.*`` keys.

    Any other override must repeat the checkpoint's value (a training command pasted with
    ``mode=eval`` added): a different one would test something other than what was trained.

    Returns:
        The validated config and the record ``results.json`` keeps: ``{"given": [the
        overrides, with the checkpoint's options that the CLI composes against], "applied":
        {key: value as applied}, "unchanged": [keys that repeat the checkpoint's values]}``.

    Raises:
        ConfigError: an override that would change what was trained (naming the key, why and
            what to do instead), another option of a group than the checkpoint's, or a test
            setting the checkpoint's algorithm cannot take (e.g. another ``n_way`` for MAML,
            whose classifier has one output per training class).
    """
    trained = from_yaml(state["config"], state["options"])
    saved = OmegaConf.structured(trained)
    now = OmegaConf.structured(current)
    for key in EVAL_RUN_KEYS:
        saved[key] = now[key]
    record: dict[str, Any] = {"given": list(overrides), "applied": {}, "unchanged": []}
    for override in overrides:
        given, _, text = override.partition("=")
        key = given.lstrip("+~")
        if key.startswith("hydra.") or key.split("@", 1)[0] in _HYDRA_ONLY_GROUPS:
            continue
        if key == "test_dataset" or key.startswith("test_dataset."):
            # Cross-domain: testing a checkpoint on other data is what mode=eval is for. Its
            # task shape and input follow the checkpoint's dataset, as when training with it
            # (composed against the command line's defaults, they would not), unless given.
            saved["test_dataset"] = now["test_dataset"]
            given_keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
            for name in TEST_DATASET_FOLLOWS:
                if f"test_dataset.{name}" not in given_keys and name in saved.dataset:
                    saved.test_dataset[name] = saved.dataset[name]
            record["applied"][key] = text
            continue
        if key in GROUPS or key == "experiment":
            chosen = state["options"].get(key)
            if key == "experiment" or text != chosen:
                raise ConfigError(other_option_message(key, text, chosen))
            record["unchanged"].append(key)
            continue
        if key in EVAL_RUN_KEYS or key.split(".", 1)[0] in EVAL_RUN_KEYS:
            record["applied"][key] = _plain(OmegaConf.select(now, key))
            continue
        value = OmegaConf.select(now, key)
        target = _test_time_key(trained, key)
        if target is None:
            if value == OmegaConf.select(saved, key):
                record["unchanged"].append(key)
                continue
            raise ConfigError(_refusal(trained, state["options"], key, value, saved))
        OmegaConf.update(saved, target, value, merge=False)
        try:
            validate(saved)
        except ConfigError as error:
            mapped = "" if target == key else f" (mode=eval applies it as {target}={value})"
            raise ConfigError(
                f"{key}: this checkpoint cannot be tested with {key}={value}{mapped}: {error}"
            ) from None
        record["applied"][target] = _plain(value)
    return validate(saved), record


def _test_time_key(trained: RunConfig, key: str) -> str | None:
    """The key ``key`` sets when a checkpoint of ``trained`` is tested, or None: it would
    change what was trained."""
    group, _, name = key.partition(".")
    if group not in ("algo", "dataset") or not name:
        return None
    fields = {f.name for f in dataclasses.fields(getattr(trained, group))}
    if group == "dataset" and name in DATA_LOCATION_KEYS and name in fields:
        return key
    if group == "dataset" and TEST_SHAPE_KEYS.get(name) in fields:
        return f"dataset.{TEST_SHAPE_KEYS[name]}"
    schema = getattr(trained, group)
    evaluation_only = getattr(type(schema), "evaluation_keys", ())
    if name in fields and (name.startswith("eval_") or name in evaluation_only):
        return f"{group}.{name}"
    return None


def test_time_keys(trained: RunConfig) -> list[str]:
    """The keys besides ``eval.*``, ``seed``, ``device`` and ``log.*`` that mode=eval takes for a
    checkpoint of ``trained`` (for messages): ``dataset.n_way/eval_n_way`` for a pair."""
    keys = []
    for group in ("dataset", "algo"):
        names = [f.name for f in dataclasses.fields(getattr(trained, group))]
        for name in names:
            shape = [k for k, v in TEST_SHAPE_KEYS.items() if v == name and group == "dataset"]
            if shape:
                keys.append(f"{group}.{shape[0]}/{name}")
            elif name not in TEST_SHAPE_KEYS and _test_time_key(trained, f"{group}.{name}"):
                keys.append(f"{group}.{name}")
    return keys


def _refusal(trained: RunConfig, options: dict[str, str], key: str, value: Any, saved: Any) -> str:
    """Why ``key=value`` cannot apply to the checkpoint and what to do instead."""
    group = key.split(".", 1)[0]
    has = f"the checkpoint has {key}={_plain(OmegaConf.select(saved, key))}, got {_plain(value)}"
    allowed = ", ".join(["eval.*", "seed", "device", "log.*", *test_time_keys(trained)])
    if group == "model":
        why = f"the network's architecture, fixed when model={options.get('model')} was trained"
    elif group == "algo":
        why = f"it sets how algo={options.get('algo')} was meta-trained"
    elif group == "dataset":
        why = f"it changes the data dataset={options.get('dataset')} was trained on"
    else:
        why = "a training setting; mode=eval trains nothing"
    return (
        f"{key}: mode=eval tests the checkpoint as it was trained and cannot change {key} "
        f"({why}; {has}). Drop {key}=..., or train with it (without mode=eval); mode=eval "
        f"takes {allowed}"
    )


def other_option_message(key: str, text: str, chosen: str | None) -> str:
    if key == "experiment":
        return (
            f"experiment={text}: mode=eval tests the checkpoint with its own config, not a preset "
            "(drop experiment=...)"
        )
    return (
        f"{key}={text} differs from the checkpoint's {key}={chosen} (drop the override: "
        f"mode=eval uses the checkpoint's {key})"
    )


def _plain(value: Any) -> Any:
    """A config value as JSON can hold it (lists and dicts as such, enums by name)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, enum_to_str=True)
    return getattr(value, "name", value) if isinstance(value, Enum) else value
