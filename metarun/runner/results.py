"""What a run reports: the test on the fixed test split, ``results.json`` and the summary the CLI
prints."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from torch import Tensor

import metarun
from metarun import plotting, registry
from metarun.algorithms.base import MetaAlgorithm
from metarun.config import RunConfig
from metarun.data.fewshot import fixed_tasks
from metarun.runner.build import Experiment
from metarun.runner.checkpoint import CHECKPOINT_DIR, LAST
from metarun.runner.evaluate import Stat, evaluate_fixed, split_scalars
from metarun.runner.logging import FIGURES_DIR, RunLogger
from metarun.tasks import FixedExamples, TaskBatch

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


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
        if test and "num_examples" in test:  # a fixed test set evaluated whole: no adaptation
            for name in ("accuracy", "error", "loss"):
                if name in test["metrics"]:
                    lines.append(
                        f"test {name}: {_stat_text(test['metrics'][name])} "
                        f"({test['num_examples']} test examples, mean ± 95% CI)"
                    )
        elif test:
            steps = test["inner_steps"]
            where = f"{test['num_tasks']} test tasks, {steps} inner step{'' if steps == 1 else 's'}"
            for name in ("accuracy", "return", "loss"):
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


def measure_test(
    experiment: Experiment, out: RunLogger, step: int, *, weights: str
) -> dict[str, Any]:
    """Test on ``eval.num_tasks`` fixed tasks; log ``test/*`` at ``step``, the curve against
    adaptation steps ``test_curve/*`` (x axis = inner steps) and, with ``eval.figures``, the
    test figures (:func:`log_test_figures`).

    With a curve, the test and the curve come from one :meth:`~metarun.algorithms.base.
    MetaAlgorithm.evaluate_curve` pass over the tasks, the test's metrics being its point at
    the test's inner steps.

    Returns:
        ``{"test": ..., "curve": [...]}``, the entries of ``results.json``.
    """
    if experiment.tasks is None:
        raise ValueError("testing needs an experiment built with data")
    config = experiment.config
    cfg = config.eval
    algorithm = experiment.algorithm
    source = experiment.tasks.test

    def tasks() -> Iterator[TaskBatch]:
        for batch in fixed_tasks(source, cfg.num_tasks, cfg.batch_size, cfg.test_seed):
            yield batch.to(experiment.device)

    if isinstance(source, FixedExamples):
        # A fixed test set evaluated whole: no tasks, no inner steps, no curve.
        stats = _measured(experiment, source, cfg.inner_steps)
        out.log(step, split_scalars("test", stats, with_ci=True))
        for name, stat in stats.items():
            logger.info("test %s: %s", name, stat)
        test = {"num_examples": len(source), "weights": weights, "metrics": _metrics(stats)}
        return {"test": test, "curve": []}
    inner_steps = algorithm.eval_steps(cfg.inner_steps)
    chosen = algorithm.curve_steps(cfg.inner_steps) if cfg.curve_steps is None else cfg.curve_steps
    curve_steps = sorted(set(chosen))
    per_step: dict[int, dict[str, Stat]] = {}
    if curve_steps:
        points = sorted(set(curve_steps) | ({inner_steps} if inner_steps is not None else set()))
        per_step = _curve_stats(algorithm, tasks(), points)
    if curve_steps and inner_steps is not None:
        stats = per_step[inner_steps]
    else:
        stats = _measured(experiment, source, cfg.inner_steps)
    out.log(step, split_scalars("test", stats, with_ci=True))
    curve = []
    for k in curve_steps:
        post = {
            key.partition("/")[2]: stat
            for key, stat in per_step[k].items()
            if key.startswith("post/")
        }
        out.log(k, {f"test_curve/{name}": stat.mean for name, stat in post.items()}, jsonl=False)
        curve.append({"inner_steps": k, **{name: stat.as_dict() for name, stat in post.items()}})
    for name, stat in stats.items():
        logger.info("test %s: %s", name, stat)
    if cfg.figures and out.active:
        log_test_figures(experiment, out, step, curve, inner_steps)
    return {
        "test": {
            "num_tasks": cfg.num_tasks,
            "inner_steps": inner_steps,
            "seed": cfg.test_seed,
            "weights": weights,
            "metrics": _metrics(stats),
        },
        "curve": curve,
    }


def _measured(experiment: Experiment, source: Any, inner_steps: int | None) -> dict[str, Stat]:
    cfg = experiment.config.eval
    return evaluate_fixed(
        experiment.algorithm,
        source,
        num_tasks=cfg.num_tasks,
        batch_size=cfg.batch_size,
        seed=cfg.test_seed,
        device=experiment.device,
        inner_steps=inner_steps,
    )


def _curve_stats(
    algorithm: MetaAlgorithm, batches: Iterable[TaskBatch], steps: list[int]
) -> dict[int, dict[str, Stat]]:
    """Mean and CI of each per-task metric after each of ``steps`` adaptation steps, from one
    ``evaluate_curve`` call per batch."""
    parts: dict[int, dict[str, list[Tensor]]] = {k: {} for k in steps}
    for batch in batches:
        for k, metrics in algorithm.evaluate_curve(batch, steps).items():
            for key, values in metrics.items():
                parts[k].setdefault(key, []).append(values.detach().flatten().cpu())
    return {
        k: {key: Stat.of(torch.cat(values)) for key, values in metrics.items()}
        for k, metrics in parts.items()
    }


def _metrics(stats: dict[str, Stat]) -> dict[str, Any]:
    """``{"post/loss": s, "pre/loss": p}`` -> ``{"loss": {...}, "pre_loss": {...}}``."""
    metrics = {}
    for key, stat in stats.items():
        stage, _, name = key.partition("/")
        metrics[name if stage == "post" else f"{stage}_{name}"] = stat.as_dict()
    return metrics


def log_test_figures(
    experiment: Experiment,
    out: RunLogger,
    step: int,
    curve: list[dict[str, Any]],
    inner_steps: int | None,
) -> list[Path]:
    """The pictures of the final test, each to ``<run_dir>/figures/<name>.png`` and TensorBoard
    ``test_figure/<name>``: ``adaptation_curve`` (the test metrics against adaptation steps with
    their 95% confidence bands) when there is a curve, and the test dataset's own
    (:meth:`~metarun.spec.bases.DatasetSchema.test_figures`; sinusoid: ``sinusoid_fit``, the
    fit before adaptation, after one step and after the test's steps).

    Without matplotlib: one warning, and the curve as a TensorBoard text table (its numbers
    are in ``results.json`` either way).

    Returns:
        The PNGs written.
    """
    config = experiment.config
    name = f"{registry.option_of('algo', config.algo).name} on {_dataset_name(config)}"
    plt = plotting.pyplot()
    if plt is None:
        logger.warning(plotting.missing(f"test figures under {out.run_dir / FIGURES_DIR}"))
        if curve:
            out.log_text("test_figure/adaptation_curve", _curve_table(curve), step)
        return []
    written = []
    if curve:
        fig = plotting.adaptation_curve(curve, f"{name}: test metrics after k adaptation steps")
        written.append(out.log_figure("adaptation_curve", fig, step))
    schema = config.test_dataset if config.test_dataset is not None else config.dataset
    if inner_steps is not None and experiment.tasks is not None:
        algorithm, device = experiment.algorithm, experiment.device

        def adapt(sx: Tensor, sy: Tensor, k: int) -> Any:
            return algorithm.adapt(sx.to(device), sy.to(device), k)

        def predict(adapted: Any, x: Tensor) -> Tensor:
            with torch.no_grad():
                return algorithm.predict(adapted, x.to(device)).detach().cpu()

        views = schema.test_figures(
            experiment.tasks.test,
            adapt,
            predict,
            sorted({0, min(1, inner_steps), inner_steps}),
            config.eval.test_seed,
        )
        for view, panels in views.items():
            fig = plotting.function_fits(panels, f"{name}: {view} (step {step})")
            written.append(out.log_figure(view, fig, step))
    return [path for path in written if path is not None]


def _dataset_name(config: RunConfig) -> str:
    schema = config.test_dataset if config.test_dataset is not None else config.dataset
    return registry.option_of("dataset", schema).name


def _curve_table(curve: list[dict[str, Any]]) -> str:
    """The curve as a Markdown table: steps, then each metric's mean ± 95% CI."""
    names = [n for n in curve[0] if n != "inner_steps"]
    rows = ["| steps | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for point in curve:
        cells = [f"{point[n]['mean']:.4g} ± {point[n]['ci95']:.2g}" for n in names]
        rows.append(f"| {point['inner_steps']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def as_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (enums as their names), for JSON and TensorBoard's hparams."""
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    return cast(dict[str, Any], container)


def write_results(run_dir: Path, results: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """Write ``<run_dir>/results.json`` atomically: ``results`` with the run dir, the metarun
    version and the config; returns what was written."""
    results = {
        **results,
        "run_dir": str(run_dir),
        "metarun_version": metarun.__version__,
        "config": as_dict(config),
    }
    path = run_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return results
