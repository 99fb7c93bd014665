"""What the CLI runs: ``run`` (train, or evaluate a checkpoint), from config to results.

The rest of the runner's top level lives beside it, by responsibility:
:mod:`~metarun.runner.resume` (when and from what a run continues),
:mod:`~metarun.runner.results` (the test split, ``results.json``, the printed summary) and
:mod:`~metarun.runner.learner` (the Python API, ``load``). Their public names are importable from
here too.

Example (Python API)::

    import metarun

    learner = metarun.load("outputs/maml_omniglot/2024-01-01_12-00-00/checkpoints/best.pt")
    predict = learner.adapt(support_x, support_y)   # one task: (S, 1, 28, 28), (S,)
    logits = predict(query_x)                       # (Q, n_way)
    labels = logits.argmax(-1)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metarun.config import ConfigError, Mode, RunConfig, options, to_yaml
from metarun.runner import distributed
from metarun.runner.build import (
    Experiment,
    build_experiment,
    build_lr_schedule,
    build_meta_optimizer,
    resolve_device,
)
from metarun.runner.checkpoint import BEST, CHECKPOINT_DIR, LAST, load_checkpoint
from metarun.runner.learner import AdaptedModel, Learner, load
from metarun.runner.logging import RunLogger, flatten
from metarun.runner.results import (
    RESULTS_FILE,
    RunSummary,
    as_dict,
    measure_test,
    write_results,
)
from metarun.runner.resume import (
    checkpoint_config,
    eval_config,
    extra_state,
    load_user_checkpoint,
    restore_trainer,
    resume_command,
    resume_state,
)
from metarun.runner.trainer import Trainer

__all__ = [
    "RESULTS_FILE",
    "AdaptedModel",
    "Learner",
    "RunSummary",
    "checkpoint_config",
    "evaluate_checkpoint",
    "load",
    "resume_command",
    "run",
    "train",
]

logger = logging.getLogger(__name__)


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
    state, resumed_from = resume_state(config, run_dir, auto_resume=auto_resume)

    experiment = build_experiment(config)
    if state is not None:
        experiment.algorithm.load_extra_state(extra_state(state))
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
            restore_trainer(trainer, state, config, resumed_from, run_dir)
        if config.log.tensorboard:
            logger.info("TensorBoard: tensorboard --logdir %s", out.tensorboard_dir)
        fit = trainer.fit()
        if fit.best is None and config.save.keep_best:
            _last_as_best(trainer, config, fit.step)
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
            if config.eval.use_best and fit.best is not None and best.exists():
                experiment.algorithm.load_state_dict(load_checkpoint(best)["algorithm"])
                weights = "best"
            results.update(measure_test(experiment, out, fit.step, weights=weights))
            test_means = {k: v["mean"] for k, v in results["test"]["metrics"].items()}
            if fit.best is not None:  # a sweep's objective (metarun.sweep.summary.objective)
                test_means[fit.best.metric.replace("/", "/best_", 1)] = fit.best.value
            # The group options too: in a sweep over algo=maml,fomaml the HParams view would
            # otherwise show the choice only through algo.first_order.
            out.log_hparams({**options(config), **flatten(as_dict(config))}, test_means)
        if ctx.is_main:
            summary.results = write_results(run_dir, results, config)
    return summary


def _last_as_best(trainer: Trainer, config: RunConfig, step: int) -> None:
    """No validation result to choose ``best.pt`` by: write the last weights under that name
    too, so that ``checkpoint=<run dir>/checkpoints/best.pt`` works for every finished run."""
    path = trainer.save(BEST)
    if config.eval.every == 0:
        why = "eval.every=0"
    elif config.eval.every > step:
        why = f"eval.every={config.eval.every} > the {step} steps trained"
    else:
        why = "no finite validation result"
    logger.info(
        "%s holds the last weights (step %d), as %s does: nothing was validated (%s)",
        path,
        step,
        LAST,
        why,
    )


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


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# ------------------------------------------------------------------------------------ eval mode


def evaluate_checkpoint(
    config: RunConfig, run_dir: str | Path, *, overrides: Sequence[str] = ()
) -> RunSummary:
    """``mode=eval``: test ``config.checkpoint`` on ``eval.num_tasks`` fixed test tasks.

    The model, algorithm and data come from the checkpoint's own config; ``eval.*``, ``seed``,
    ``device`` and ``log.*`` from ``config``. Of ``overrides``, those that change how the
    checkpoint is tested apply to its config (e.g. ``dataset.root=...`` when the data moved,
    ``dataset.n_way=20`` for 20-way test tasks, ``algo.eval_inner_steps=10``); one that would
    change what was trained is a ConfigError (:func:`metarun.runner.resume.eval_config`).
    ``results.json`` records them under ``overrides``.
    """
    run_dir = Path(run_dir)
    if config.checkpoint is None:  # RunConfig checks this; here for a direct API call
        raise ConfigError("checkpoint must be set with mode=eval, got None")
    state = load_user_checkpoint(config.checkpoint, "checkpoint")
    saved, record = eval_config(state, config, overrides)
    if record["applied"]:
        logger.info(
            "testing %s with %s",
            config.checkpoint,
            " ".join(f"{key}={value}" for key, value in record["applied"].items()),
        )
    experiment = build_experiment(saved)
    experiment.algorithm.load_state_dict(state["algorithm"])
    step = int(state["step"])
    with RunLogger(run_dir, tensorboard=config.log.tensorboard) as out:
        results: dict[str, Any] = {
            "mode": "eval",
            "step": step,
            "task_type": experiment.task_type,
            "checkpoint": str(Path(config.checkpoint).expanduser().resolve()),
            "overrides": record,
            **measure_test(experiment, out, step, weights=Path(config.checkpoint).name),
        }
        summary = RunSummary(
            mode="eval",
            run_dir=run_dir,
            step=step,
            tensorboard_dir=out.tensorboard_dir if config.log.tensorboard else None,
        )
        summary.results = write_results(run_dir, results, saved)
    return summary
