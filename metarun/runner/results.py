"""What a run reports: the test on the fixed test split, ``results.json`` and the summary the CLI
prints."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

import metarun
from metarun.config import RunConfig
from metarun.runner.build import Experiment
from metarun.runner.checkpoint import CHECKPOINT_DIR, LAST
from metarun.runner.evaluate import Stat, evaluate_fixed, split_scalars
from metarun.runner.logging import RunLogger
from metarun.tasks import FixedExamples

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


def measure_test(
    experiment: Experiment, out: RunLogger, step: int, *, weights: str
) -> dict[str, Any]:
    """Test on ``eval.num_tasks`` fixed tasks; log ``test/*`` at ``step`` and the inner-step curve
    ``test_curve/*`` (x axis = inner steps).

    Returns:
        ``{"test": ..., "curve": [...]}``, the entries of ``results.json``.
    """
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
    if isinstance(experiment.tasks.test, FixedExamples):
        # A fixed test set evaluated whole: no tasks, no inner steps.
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
    inner_steps = experiment.algorithm.eval_steps(cfg.inner_steps)
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
