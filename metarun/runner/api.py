"""What the CLI runs (``run``: train or evaluate a checkpoint) and the Python API (``load``).

Example (Python API)::

    import metarun

    learner = metarun.load("outputs/maml_omniglot/2024-01-01_12-00-00/checkpoints/best.pt")
    predict = learner.adapt(support_x, support_y)   # one task: (S, 1, 28, 28), (S,)
    logits = predict(query_x)                       # (Q, n_way)
    labels = logits.argmax(-1)
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import metarun
from metarun.algorithms.base import MetaAlgorithm
from metarun.config import (
    ConfigError,
    Mode,
    RunConfig,
    from_yaml,
    options,
    to_yaml,
    validate,
)
from metarun.data.supervised import ExampleSet
from metarun.runner import distributed
from metarun.runner.build import (
    Experiment,
    build_experiment,
    build_lr_schedule,
    build_meta_optimizer,
    resolve_device,
)
from metarun.runner.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    load_checkpoint,
    load_latest,
    previous_path,
)
from metarun.runner.evaluate import Stat, evaluate_fixed, split_scalars
from metarun.runner.logging import RunLogger, flatten
from metarun.runner.trainer import Trainer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
# Keys that may change when a run is resumed without being a different experiment.
_RESUMABLE_CHANGES = (
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
_GROUPS = ("algo", "dataset", "model")


@dataclass
class RunSummary:
    """What a run did, for the CLI to print."""

    mode: str
    run_dir: Path
    step: int
    results: dict[str, Any] = field(default_factory=dict)
    stopped_by: str | None = None
    resume_command: str | None = None
    tensorboard_dir: Path | None = None

    def format(self) -> str:
        """Human-readable summary: test metrics with 95% CIs, where things are, what next."""
        lines = []
        if self.stopped_by is not None:
            lines.append(
                f"stopped by {self.stopped_by} after step {self.step}; checkpoint saved to "
                f"{self.run_dir / CHECKPOINT_DIR / LAST}"
            )
            lines.append(f"resume with: {self.resume_command}")
        test = self.results.get("test")
        if test and "num_examples" in test:  # a fixed test set (algo=l2rw / erm): no adaptation
            for name in ("accuracy", "error", "loss"):
                if name in test["metrics"]:
                    lines.append(
                        f"test {name}: {_stat_text(test['metrics'][name])} "
                        f"({test['num_examples']} test examples, mean ± 95% CI)"
                    )
        elif test:
            steps = test["inner_steps"]
            where = f"{test['num_tasks']} test tasks, {steps} inner step{'' if steps == 1 else 's'}"
            for name in ("accuracy", "loss"):
                if name in test["metrics"]:
                    post = _stat_text(test["metrics"][name])
                    pre = _stat_text(test["metrics"].get(f"pre_{name}"))
                    lines.append(
                        f"test {name}: {post} (before adaptation {pre}; {where}, mean ± 95% CI)"
                    )
        lines.append(f"run dir: {self.run_dir}")
        if self.tensorboard_dir is not None:
            lines.append(f"tensorboard --logdir {self.tensorboard_dir}")
        return "\n".join(lines)


def _stat_text(stat: dict[str, Any] | None) -> str:
    return "n/a" if stat is None else f"{stat['mean']:.4f} ± {stat['ci95']:.4f}"


def run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    auto_resume: bool = False,
) -> RunSummary:
    """Meta-train (``mode=train``) or test a checkpoint (``mode=eval``).

    Args:
        config: the validated configuration.
        run_dir: where checkpoints, logs and ``results.json`` go (Hydra's output dir).
        overrides: the command-line overrides, to print an exact resume command and, in eval
            mode, to apply ``algo.*`` / ``dataset.*`` overrides on top of the checkpoint's config.
        auto_resume: training continues from ``<run_dir>/checkpoints/last.pt`` if it exists, as
            with ``resume=true``, provided it holds the same experiment (see :func:`train`).
            The CLI sets it for sweep jobs, whose run dir is their own: a checkpoint there comes
            from an earlier attempt of the same job (requeued after a preemption or time limit,
            or the sweep run again with the same ``hydra.sweep.dir``).

    Raises:
        ConfigError: a setting the run cannot use. FileNotFoundError: missing data or checkpoint.
    """
    if config.mode is Mode.eval:
        return evaluate_checkpoint(config, run_dir, overrides=overrides)
    return train(config, run_dir, overrides=overrides, auto_resume=auto_resume)


# ------------------------------------------------------------------------------------------ train


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    auto_resume: bool = False,
) -> RunSummary:
    """Meta-train, checkpoint, then test on ``eval.num_tasks`` fixed tasks.

    With ``resume=true`` and ``<run_dir>/checkpoints/last.pt`` present, training continues from
    it exactly (same parameters as an uninterrupted run). Without ``resume=true`` an existing
    checkpoint is an error rather than silently overwritten. ``auto_resume`` continues from it
    too, but only if it was written with the same config (keys that may change on resume
    aside); a different experiment in the run dir is an error.
    """
    ctx = distributed.setup(resolve_device(config.device))
    try:
        if ctx.enabled:
            if resolve_device(config.device).type == "cuda":
                config.device = f"cuda:{ctx.local_rank}"
            # torchrun starts N Hydra apps, each with its own timestamped dir: use rank 0's.
            run_dir = distributed.broadcast(str(run_dir), ctx)
        return _train(config, run_dir, overrides, ctx, auto_resume=auto_resume)
    finally:
        distributed.teardown(ctx)


def _train(
    config: RunConfig,
    run_dir: str | Path,
    overrides: Sequence[str],
    ctx: distributed.DistContext,
    *,
    auto_resume: bool = False,
) -> RunSummary:
    run_dir = Path(run_dir)
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
        _check_same_options(state, config, resumed_from, run_dir)
        if config.resume:
            _warn_config_changes(state["config"], to_yaml(config))
        elif changed := _config_changes(state["config"], to_yaml(config)):
            raise ConfigError(
                f"the run dir {run_dir} holds a checkpoint of another experiment ({last} "
                f"differs in: {', '.join(changed)}); a sweep job continues only its own run "
                "(choose a new hydra.sweep.dir)"
            )
        else:
            logger.info("continuing the run in %s from %s", run_dir, last)
    elif config.resume:
        logger.warning("resume=true but %s does not exist: starting from step 0", last)

    experiment = build_experiment(config)
    if state is not None:
        experiment.algorithm.load_extra_state(_extra_state(state))
    else:
        _before_training(experiment)
    meta_optimizer = build_meta_optimizer(
        config.meta_optimizer, experiment.algorithm.meta_parameters()
    )
    lr_schedule = build_lr_schedule(config.meta_optimizer, config.outer_steps)
    # E.g. L2RW's look-ahead steps a differentiable copy of the training optimizer.
    experiment.algorithm.attach_optimizer(meta_optimizer)
    if ctx.enabled and experiment.algorithm.splits_examples:
        experiment.algorithm.set_shards(distributed.example_shards(config.dataset, ctx))
    resume_step = int(state["step"]) if state is not None else None
    with RunLogger(
        run_dir,
        tensorboard=config.log.tensorboard,
        resume_step=resume_step,
        active=ctx.is_main,
    ) as out:
        trainer = Trainer(
            experiment,
            meta_optimizer,
            out,
            run_dir,
            config_yaml=to_yaml(config),
            options=options(config),
            dist_ctx=ctx,
            lr_schedule=lr_schedule,
        )
        if state is not None:
            try:
                trainer.load_state_dict(state)
            except (RuntimeError, ValueError, KeyError) as error:
                # Tensor shapes or optimizer groups that differ: a model-size or dataset key
                # changed (e.g. dataset.n_way, model.hidden_sizes).
                changed = _config_changes(state["config"], to_yaml(config))
                detail = (str(error).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"resume: the checkpoint {resumed_from} of the run in {run_dir} does not fit "
                    f"this config (it differs in: {', '.join(changed) or 'nothing visible'}; "
                    f"{type(error).__name__}: {detail[:200]}); resume with the checkpoint's "
                    "values, or choose a new hydra.run.dir"
                ) from None
            # Fell back to the previous checkpoint: the next save keeps it, not the unreadable one.
            trainer.rotate_last = resumed_from == last
            logger.info("resumed %s at step %d", resumed_from, trainer.step)
        if config.log.tensorboard:
            logger.info("TensorBoard: tensorboard --logdir %s", out.tensorboard_dir)
        fit = trainer.fit()
        summary = RunSummary(
            mode="train",
            run_dir=run_dir,
            step=fit.step,
            stopped_by=fit.stopped_by,
            tensorboard_dir=out.tensorboard_dir if config.log.tensorboard else None,
        )
        results: dict[str, Any] = {
            "mode": "train",
            "step": fit.step,
            "task_type": experiment.task_type,
            "best": asdict(fit.best) if fit.best is not None else None,
            "checkpoint": str(last),
        }
        if fit.stopped_by is not None:
            summary.resume_command = resume_command(overrides, run_dir)
            results["stopped_by"] = fit.stopped_by
            logger.warning("%s: resume with: %s", fit.stopped_by, summary.resume_command)
        else:
            weights = "last"
            best = run_dir / CHECKPOINT_DIR / BEST
            if config.eval.use_best and best.exists():
                experiment.algorithm.load_state_dict(load_checkpoint(best)["algorithm"])
                weights = "best"
            results.update(_test(experiment, out, fit.step, weights=weights))
            test_means = {k: v["mean"] for k, v in results["test"]["metrics"].items()}
            if fit.best is not None:  # a sweep's objective (metarun.sweep.summary.objective)
                test_means[fit.best.metric.replace("/", "/best_", 1)] = fit.best.value
            # The group options too: in a sweep over algo=maml,fomaml the HParams view would
            # otherwise show the choice only through algo.first_order.
            out.log_hparams({**options(config), **flatten(_as_dict(config))}, test_means)
        if ctx.is_main:
            summary.results = _write_results(run_dir, results, config)
    return summary


def _before_training(experiment: Experiment) -> None:
    """The algorithm's start-up hook (e.g. MAML's task-batching measurement), with meta-batches
    drawn from a generator of its own so that the training tasks are those of a run without
    it."""
    tasks = experiment.tasks
    if tasks is None:
        raise ValueError("the experiment was built without data")
    config = experiment.config
    generator = torch.Generator().manual_seed(config.seed + 1)

    def sample() -> Any:
        return tasks.train.sample(config.meta_batch_size, generator).to(experiment.device)

    # The hook may run meta-steps: keep them from touching the run's random streams.
    with torch.random.fork_rng(devices=_cuda_devices(experiment.device)):
        experiment.algorithm.before_training(sample, experiment.device)


def _extra_state(state: dict[str, Any]) -> dict[str, Any] | None:
    """The algorithm's extra state in a checkpoint (older checkpoints: MAML's task batching
    under its own key)."""
    if "algorithm_extra" in state:
        return cast("dict[str, Any] | None", state["algorithm_extra"])
    if state.get("task_batching") is not None:
        return {"task_batching": state["task_batching"]}
    return None


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _check_same_options(
    state: dict[str, Any], config: RunConfig, path: Path, run_dir: Path
) -> None:
    """Resuming with another algorithm, dataset or model is another experiment: refuse, naming
    the options that differ."""
    now = options(config)
    saved = state.get("options", {})
    differ = [g for g in _GROUPS if saved.get(g) != now.get(g)]
    if differ:
        theirs = " ".join(f"{g}={saved.get(g)}" for g in differ)
        ours = " ".join(f"{g}={now.get(g)}" for g in differ)
        raise ConfigError(
            f"resume: the run in {run_dir} is another experiment: its checkpoint {path} has "
            f"{theirs}, this command {ours} (resume with {theirs}, or choose a new "
            "hydra.run.dir)"
        )


def _load_user_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
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


def _config_changes(saved_yaml: str, current_yaml: str) -> list[str]:
    """Keys whose values differ, except those a resumed run may change (``outer_steps``, ...)."""

    def flat(text: str) -> dict[str, Any]:
        return flatten(cast(dict[str, Any], OmegaConf.to_container(OmegaConf.create(text))))

    saved, current = flat(saved_yaml), flat(current_yaml)
    return sorted(
        key
        for key in saved.keys() | current.keys()
        if saved.get(key) != current.get(key) and not key.startswith(_RESUMABLE_CHANGES)
    )


def _warn_config_changes(saved_yaml: str, current_yaml: str) -> None:
    changed = _config_changes(saved_yaml, current_yaml)
    if changed:
        logger.warning(
            "resuming with a config that differs from the checkpoint's in: %s "
            "(the run continues with the new values)",
            ", ".join(changed),
        )


# ------------------------------------------------------------------------------------------- test


def _test(experiment: Experiment, out: RunLogger, step: int, *, weights: str) -> dict[str, Any]:
    """Test on ``eval.num_tasks`` fixed tasks; log ``test/*`` at ``step`` and the inner-step curve
    ``test_curve/*`` (x axis = inner steps)."""
    if experiment.tasks is None:
        raise ValueError("testing needs an experiment built with data")
    config = experiment.config
    cfg = config.eval

    def measure(inner_steps: int | None) -> dict[str, Stat]:
        return evaluate_fixed(
            experiment.algorithm,
            experiment.tasks.test,  # type: ignore[union-attr]
            num_tasks=cfg.num_tasks,
            batch_size=cfg.batch_size,
            seed=cfg.test_seed,
            device=experiment.device,
            inner_steps=inner_steps,
        )

    stats = measure(cfg.inner_steps)
    scalars = split_scalars("test", stats, with_ci=True)
    out.log(step, scalars)
    metrics = {}
    for key, stat in stats.items():
        stage, _, name = key.partition("/")
        metrics[name if stage == "post" else f"{stage}_{name}"] = stat.as_dict()
    if isinstance(experiment.tasks.test, ExampleSet):
        # A fixed test set evaluated whole (algo=l2rw / erm): no tasks, no inner steps.
        for name, stat in stats.items():
            logger.info("test %s: %s", name, stat)
        test = {"num_examples": len(experiment.tasks.test), "weights": weights, "metrics": metrics}
        return {"test": test, "curve": []}
    curve = []
    for k in cfg.curve_steps:
        post = {
            key.partition("/")[2]: stat
            for key, stat in measure(k).items()
            if key.startswith("post/")
        }
        out.log(k, {f"test_curve/{name}": stat.mean for name, stat in post.items()}, jsonl=False)
        curve.append({"inner_steps": k, **{name: stat.as_dict() for name, stat in post.items()}})
    inner_steps = cfg.inner_steps if cfg.inner_steps is not None else config.algo.eval_inner_steps
    for name, stat in stats.items():
        logger.info("test %s: %s", name, stat)
    return {
        "test": {
            "num_tasks": cfg.num_tasks,
            "inner_steps": inner_steps,
            "seed": cfg.test_seed,
            "weights": weights,
            "metrics": metrics,
        },
        "curve": curve,
    }


def _as_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (enums as their names), for JSON and TensorBoard's hparams."""
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    return cast(dict[str, Any], container)


def _write_results(run_dir: Path, results: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    results = {
        **results,
        "run_dir": str(run_dir),
        "metarun_version": metarun.__version__,
        "config": _as_dict(config),
    }
    path = run_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return results


# ------------------------------------------------------------------------------------ eval mode


def evaluate_checkpoint(
    config: RunConfig, run_dir: str | Path, *, overrides: Sequence[str] = ()
) -> RunSummary:
    """``mode=eval``: test ``config.checkpoint`` on ``eval.num_tasks`` fixed test tasks.

    The model, algorithm and data come from the checkpoint's own config; ``eval.*``, ``seed``,
    ``device`` and ``log.*`` from ``config``, as do the ``algo.*`` / ``dataset.*`` / ``model.*``
    keys set in ``overrides`` (e.g. ``dataset.root=...`` when the data moved, or
    ``algo.eval_inner_steps=10``).
    """
    run_dir = Path(run_dir)
    if config.checkpoint is None:  # RunConfig checks this; here for a direct API call
        raise ConfigError("checkpoint must be set with mode=eval, got None")
    state = _load_user_checkpoint(config.checkpoint, "checkpoint")
    saved = checkpoint_config(state, current=config, overrides=overrides)
    experiment = build_experiment(saved)
    experiment.algorithm.load_state_dict(state["algorithm"])
    step = int(state["step"])
    with RunLogger(run_dir, tensorboard=config.log.tensorboard) as out:
        results: dict[str, Any] = {
            "mode": "eval",
            "step": step,
            "task_type": experiment.task_type,
            "checkpoint": str(Path(config.checkpoint).expanduser().resolve()),
            **_test(experiment, out, step, weights=Path(config.checkpoint).name),
        }
        summary = RunSummary(
            mode="eval",
            run_dir=run_dir,
            step=step,
            tensorboard_dir=out.tensorboard_dir if config.log.tensorboard else None,
        )
        summary.results = _write_results(run_dir, results, saved)
    return summary


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
            if key in _GROUPS and value != state["options"].get(key):
                raise ConfigError(
                    f"{key}={value} differs from the checkpoint's {key}="
                    f"{state['options'].get(key)} (drop the override: mode=eval uses the "
                    f"checkpoint's {key})"
                )
            if key.split(".", 1)[0] in _GROUPS and "." in key:
                OmegaConf.update(saved, key, OmegaConf.select(now, key), merge=False)
    return validate(saved)


# ------------------------------------------------------------------------------------ Python API


class AdaptedModel:
    """The model adapted to one task: call it on query inputs to get outputs (logits for
    classification, predictions for regression).

    Attributes:
        params: the fast parameters, keyed like ``model.named_parameters()`` (detached).
    """

    def __init__(
        self, algorithm: MetaAlgorithm, params: dict[str, Tensor], device: torch.device
    ) -> None:
        self.algorithm = algorithm
        self.params = params
        self.device = device

    def __call__(self, query_x: Tensor) -> Tensor:
        """``(Q, *input_shape) -> (Q, num_outputs)``."""
        with torch.no_grad():
            return self.algorithm.predict(self.params, query_x.to(self.device))


class Learner:
    """A meta-trained algorithm, loaded from a checkpoint by :func:`load`.

    Attributes:
        algorithm: the :class:`~metarun.algorithms.base.MetaAlgorithm` (an ``nn.Module``).
        config: the checkpoint's :class:`~metarun.config.RunConfig`.
        task_type: ``"classification"`` or ``"regression"``.
        step: outer steps the checkpoint was trained for.
    """

    def __init__(
        self,
        algorithm: MetaAlgorithm,
        config: RunConfig,
        task_type: str,
        step: int,
        device: torch.device,
    ) -> None:
        self.algorithm = algorithm
        self.config = config
        self.task_type = task_type
        self.step = step
        self.device = device

    @property
    def model(self) -> nn.Module:
        """The network with the meta-learned initial weights."""
        return self.algorithm.model

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Adapt to one task (no task dimension) and return its predictor.

        Args:
            support_x: ``(S, *input_shape)`` support inputs.
            support_y: ``(S,)`` int64 labels in ``[0, n_way)`` or ``(S, 1)`` float targets.
            steps: inner steps; default ``algo.eval_inner_steps`` of the checkpoint.

        Returns:
            A callable ``predict(query_x) -> outputs``.
        """
        # Adaptation takes gradients even if the caller is inside torch.no_grad().
        with torch.enable_grad():
            params = self.algorithm.adapt(
                support_x.to(self.device), support_y.to(self.device), steps
            )
        return AdaptedModel(self.algorithm, {k: v.detach() for k, v in params.items()}, self.device)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Learner({options(c)}, task_type={self.task_type!r}, step={self.step}, "
            f"device={self.device})"
        )


def load(path: str | Path, device: str | torch.device = "cpu") -> Learner:
    """Load a checkpoint written by ``metarun`` for adaptation and prediction.

    Args:
        path: a checkpoint, e.g. ``<run dir>/checkpoints/best.pt`` (or ``last.pt``).
        device: where to put the model.

    Returns:
        A :class:`Learner`; ``learner.adapt(support_x, support_y)(query_x)`` gives outputs.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``path`` is not a metarun checkpoint (:class:`ConfigError` if its config
            no longer validates).

    Example:
        >>> learner = metarun.load("outputs/maml_sinusoid/<time>/checkpoints/last.pt")
        >>> predict = learner.adapt(support_x, support_y, steps=10)  # (K, 1), (K, 1)
        >>> y_hat = predict(torch.linspace(-5, 5, 100).unsqueeze(-1))  # (100, 1)
    """
    device = torch.device(device)
    state = load_checkpoint(path, map_location=device)
    config = checkpoint_config(state)
    # Building initialises weights from the global RNG; leave the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        experiment = build_experiment(config, with_data=False, device=device, seed=False)
    experiment.algorithm.load_state_dict(state["algorithm"])
    return Learner(experiment.algorithm, config, experiment.task_type, int(state["step"]), device)
