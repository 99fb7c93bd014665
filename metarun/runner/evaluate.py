"""Evaluation on fixed tasks: per-task metrics, their mean and 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from metarun.algorithms.base import MetaAlgorithm
from metarun.data.fewshot import TaskSource, fixed_tasks
from metarun.tasks import FixedExamples, TaskBatch


@dataclass(frozen=True)
class Stat:
    """Mean over ``n`` tasks and the half-width of its 95% confidence interval,
    ``1.96 * std / sqrt(n)`` (the MAML paper's convention)."""

    mean: float
    ci95: float
    n: int

    @classmethod
    def of(cls, values: Tensor) -> Stat:
        values = values.detach().double().flatten().cpu()
        n = int(values.numel())
        if n == 0:
            return cls(math.nan, math.nan, 0)
        std = float(values.std(unbiased=True)) if n > 1 else 0.0
        return cls(float(values.mean()), 1.96 * std / math.sqrt(n), n)

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci95": self.ci95, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.ci95:.4f}"


def evaluate_batches(
    algorithm: MetaAlgorithm,
    batches: Iterable[TaskBatch],
    device: torch.device,
    inner_steps: int | None = None,
) -> dict[str, Tensor]:
    """Run ``algorithm.evaluate`` on every batch and concatenate the per-task results.

    Returns:
        ``{"pre/loss": (N,), "post/loss": (N,), ...}`` on the CPU, as the algorithm keys them.
    """
    parts: dict[str, list[Tensor]] = {}
    for batch in batches:
        for key, values in algorithm.evaluate(batch.to(device), inner_steps).items():
            parts.setdefault(key, []).append(values.detach().flatten().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def evaluate_fixed(
    algorithm: MetaAlgorithm,
    source: TaskSource,
    *,
    num_tasks: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    inner_steps: int | None = None,
) -> dict[str, Stat]:
    """Mean and CI of each per-task metric over ``num_tasks`` tasks fixed by ``seed``.

    A :class:`~metarun.tasks.FixedExamples` source (e.g. the clean and test sets of the
    reweighting datasets) is evaluated whole instead, example by example: ``num_tasks``,
    ``batch_size`` and ``seed`` do not apply, and each metric is per example.

    Returns:
        ``{"pre/loss": Stat, "post/loss": Stat, ...}``.
    """
    if isinstance(source, FixedExamples):
        batches = source.batches()
    else:
        batches = fixed_tasks(source, num_tasks, batch_size, seed)
    per_task = evaluate_batches(algorithm, batches, device, inner_steps)
    return {key: Stat.of(values) for key, values in per_task.items()}


def split_scalars(split: str, stats: dict[str, Stat], *, with_ci: bool = False) -> dict[str, float]:
    """``{"post/accuracy": s, "pre/accuracy": p}`` -> ``{"<split>/accuracy": s.mean,
    "<split>/pre_accuracy": p.mean}`` (post-adaptation is the headline number), plus
    ``..._ci95`` entries when ``with_ci``."""
    scalars: dict[str, float] = {}
    for key, stat in stats.items():
        stage, _, name = key.partition("/")
        tag = f"{split}/{name}" if stage == "post" else f"{split}/{stage}_{name}"
        scalars[tag] = stat.mean
        if with_ci:
            scalars[f"{tag}_ci95"] = stat.ci95
    return scalars
