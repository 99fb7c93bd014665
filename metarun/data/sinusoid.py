"""Sinusoid regression tasks (Finn et al. 2017, Sec. 5.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from metarun.registry import register
from metarun.spec.bases import Adapt, DatasetSchema, FunctionFit, Predict
from metarun.spec.checks import require, require_optional_count, require_range
from metarun.tasks import TaskBatch, TaskSources


def _check_range(key: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low <= high:
        raise ValueError(f"{key} must be (low, high) with low <= high, got {tuple(value)}")
    return low, high


class SinusoidTasks:
    """Tasks ``y = A * sin(x - phase)`` with ``A``, ``phase`` and ``x`` drawn uniformly per task.

    Args:
        k_shot: support points per task.
        k_query: query points per task.
        amplitude: ``(low, high)`` range of ``A``.
        phase: ``(low, high)`` range of the phase.
        x_range: ``(low, high)`` range of the inputs.

    Raises:
        ValueError: ``k_shot`` or ``k_query`` below 1, or a range with ``low > high``.

    References:
        Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
        ICML 2017 (amplitude in [0.1, 5.0], phase in [0, pi], x in [-5, 5]).

    Example:
        >>> tasks = SinusoidTasks(k_shot=10)
        >>> batch = tasks.sample(4, torch.Generator().manual_seed(0))
        >>> batch.support_x.shape
        torch.Size([4, 10, 1])
    """

    task_type = "regression"
    num_outputs = 1
    input_shape = (1,)

    def __init__(
        self,
        k_shot: int = 10,
        k_query: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        if k_shot < 1:
            raise ValueError(
                f"dataset.k_shot must be >= 1, got {k_shot} (set e.g. dataset.k_shot=10)"
            )
        if k_query < 1:
            raise ValueError(
                f"dataset.k_query must be >= 1, got {k_query} (set e.g. dataset.k_query=10)"
            )
        self.k_shot = int(k_shot)
        self.k_query = int(k_query)
        self.amplitude = _check_range("dataset.amplitude", amplitude)
        self.phase = _check_range("dataset.phase", phase)
        self.x_range = _check_range("dataset.x_range", x_range)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``batch_size`` tasks using only ``generator`` for randomness.

        Returns:
            A :class:`TaskBatch` of float32 tensors: support ``(T, k_shot, 1)``, query
            ``(T, k_query, 1)`` for both inputs and targets.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        t, k = batch_size, self.k_shot + self.k_query

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            # In place: the same two roundings as `rand * (high - low) + low`, two fewer tensors.
            return torch.rand(shape, generator=generator).mul_(high - low).add_(low)

        amplitude = uniform((t, 1, 1), self.amplitude)  # (T, 1, 1)
        phase = uniform((t, 1, 1), self.phase)  # (T, 1, 1)
        x = uniform((t, k, 1), self.x_range)  # (T, K+Q, 1)
        y = amplitude * torch.sin(x - phase)  # (T, K+Q, 1)
        s = self.k_shot
        return TaskBatch(
            x[:, :s].contiguous(),
            y[:, :s].contiguous(),
            x[:, s:].contiguous(),
            y[:, s:].contiguous(),
        )

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(k_shot={self.k_shot}, k_query={self.k_query}, "
            f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})"
        )


@dataclass
class SinusoidConfig(DatasetSchema):
    """``dataset=sinusoid``: regression on ``A sin(x - phase)`` (Finn et al. 2017, Sec. 5.1)."""

    k_shot: int = 10
    k_query: int = 10
    # Support/query sizes of validation and test tasks; null = same as training.
    eval_k_shot: int | None = None
    eval_k_query: int | None = None
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])

    task_type: ClassVar[str] = "regression"
    models: ClassVar[tuple[str, ...]] = ("mlp",)

    def __post_init__(self) -> None:
        require(self.k_shot >= 1, "dataset.k_shot", self.k_shot, ">= 1", "dataset.k_shot=10")
        require(self.k_query >= 1, "dataset.k_query", self.k_query, ">= 1", "dataset.k_query=10")
        require_optional_count("dataset.eval_k_shot", self.eval_k_shot, "dataset.eval_k_shot=5")
        require_optional_count("dataset.eval_k_query", self.eval_k_query, "dataset.eval_k_query=10")
        require_range("dataset.amplitude", self.amplitude, "dataset.amplitude=[0.1,5.0]")
        require_range("dataset.phase", self.phase, "dataset.phase=[0,3.14159]")
        require_range("dataset.x_range", self.x_range, "dataset.x_range=[-5,5]")

    def check_model(self, model: Any) -> None:
        for key in ("in_features", "out_features"):
            value = getattr(model, key)
            require(value == 1, f"model.{key}", value, "1 for dataset=sinusoid", f"model.{key}=1")

    def test_figures(
        self, source: Any, adapt: Adapt, predict: Predict, steps: Sequence[int], seed: int
    ) -> dict[str, list[FunctionFit]]:
        """``sinusoid_fit``: three test tasks as in Finn et al. 2017, Fig. 2 (the true function,
        the K support points, the prediction before adaptation and after each of ``steps``)."""
        if not isinstance(source, SinusoidTasks):  # a cross-domain test set of other tasks
            return {}
        return {"sinusoid_fit": sinusoid_fits(source, adapt, predict, steps, seed)}


def sinusoid_fits(
    tasks: SinusoidTasks,
    adapt: Adapt,
    predict: Predict,
    steps: Sequence[int],
    seed: int,
    num_tasks: int = 3,
    grid: int = 200,
) -> list[FunctionFit]:
    """:class:`~metarun.spec.bases.FunctionFit` panels of ``num_tasks`` tasks of ``tasks``
    drawn from ``seed`` (their own generator: the test tasks are untouched)."""
    generator = torch.Generator().manual_seed(seed)
    low, high = tasks.x_range
    x = torch.linspace(low, high, grid).unsqueeze(-1)  # (G, 1)
    panels = []
    for _ in range(num_tasks):
        amplitude = float(torch.empty(()).uniform_(*tasks.amplitude, generator=generator))
        phase = float(torch.empty(()).uniform_(*tasks.phase, generator=generator))
        sx = torch.empty(tasks.k_shot, 1).uniform_(low, high, generator=generator)  # (K, 1)
        sy = amplitude * torch.sin(sx - phase)  # (K, 1)
        predictions = {
            k: predict(adapt(sx, sy, k), x).reshape(-1).tolist() for k in sorted(set(steps))
        }
        panels.append(
            FunctionFit(
                x=x.reshape(-1).tolist(),
                truth=(amplitude * torch.sin(x - phase)).reshape(-1).tolist(),
                support_x=sx.reshape(-1).tolist(),
                support_y=sy.reshape(-1).tolist(),
                predictions=predictions,
                title=f"A = {amplitude:.2f}, phase = {phase:.2f}",
            )
        )
    return panels


@register("dataset", "sinusoid", SinusoidConfig)
def build_sinusoid(config: SinusoidConfig) -> TaskSources:
    amplitude, phase, x_range = (
        (float(r[0]), float(r[1])) for r in (config.amplitude, config.phase, config.x_range)
    )
    train = SinusoidTasks(config.k_shot, config.k_query, amplitude, phase, x_range)
    # One distribution: val and test differ from training only by their fixed seeds.
    held_out = SinusoidTasks(
        config.eval_k_shot or config.k_shot,
        config.eval_k_query or config.k_query,
        amplitude,
        phase,
        x_range,
    )
    return TaskSources(train=train, val=held_out, test=held_out)
