"""2D navigation (Finn et al. 2017, Sec. 5.3): a point agent moves to a goal drawn uniformly from
[-0.5, 0.5]^2. Written in torch, vectorised over tasks and episodes: no simulator.

Dynamics and reward as the authors' environment (cbfinn/maml_rl,
``maml_examples/point_env_randgoal.py``, wrapped in rllab's ``normalize``): the agent starts at
the origin, its action is a velocity clipped to [-1, 1] per coordinate and scaled by
``max_action`` (0.1), the reward is minus the distance to the goal after the move, and an
episode ends when both coordinates are within 0.01 of the goal or after ``horizon`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from metarun.registry import register
from metarun.rl.env import RLDatasetSchema
from metarun.spec.checks import require, require_range
from metarun.tasks import TaskBatch, TaskSources


class Navigation2D:
    """The vectorised point environment (:class:`metarun.rl.VectorEnv`).

    Args:
        horizon: steps per episode.
        max_action: largest move per step and coordinate.
        tolerance: an episode ends when both coordinates are this close to the goal.
        device: where the state lives.
        dtype: of observations and rewards.
    """

    observation_dim = 2
    action_dim = 2

    def __init__(
        self,
        horizon: int = 100,
        max_action: float = 0.1,
        tolerance: float = 0.01,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.horizon = int(horizon)
        self.max_action = float(max_action)
        self.tolerance = float(tolerance)
        self.device = torch.device(device)
        self.dtype = dtype
        self._goals = torch.zeros(0, 1, 2)
        self._state = torch.zeros(0, 0, 2)

    def reset(
        self, tasks: Tensor, episodes: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """``tasks``: ``(T, 2)`` goals -> ``(T, N, 2)`` start positions (the origin: the
        ``generator`` is not used)."""
        self._goals = tasks.to(self.device, self.dtype).unsqueeze(1)  # (T, 1, 2)
        self._state = torch.zeros(tasks.shape[0], episodes, 2, device=self.device, dtype=self.dtype)
        return self._state.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        move = actions.to(self.dtype).clamp(-1.0, 1.0) * self.max_action
        self._state = self._state + move
        offset = self._state - self._goals  # (T, N, 2)
        reward = -torch.linalg.vector_norm(offset, dim=-1)
        done = (offset.abs() < self.tolerance).all(-1)
        return self._state.clone(), reward, done


class GoalTasks:
    """Goals drawn uniformly from a box, with per-task seeds for the episodes' action noise (the
    meta-RL :class:`~metarun.tasks.TaskBatch` layout: :mod:`metarun.rl.env`)."""

    def __init__(self, low: float, high: float, dim: int = 2) -> None:
        self.low, self.high, self.dim = float(low), float(high), int(dim)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        goals = torch.rand(batch_size, self.dim, generator=generator)
        goals = goals.mul_(self.high - self.low).add_(self.low)
        seeds = torch.randint(0, 2**62, (2, batch_size), generator=generator)
        return TaskBatch(goals, seeds[0], goals.clone(), seeds[1])

    def __repr__(self) -> str:
        return f"GoalTasks(low={self.low}, high={self.high}, dim={self.dim})"


@dataclass
class Navigation2DConfig(RLDatasetSchema):
    """``dataset=navigation2d``: reach a goal in [-0.5, 0.5]^2 (Finn et al. 2017, Sec. 5.3)."""

    horizon: int = 100
    goal_range: list[float] = field(default_factory=lambda: [-0.5, 0.5])
    max_action: float = 0.1
    tolerance: float = 0.01

    observation_dim: ClassVar[int] = 2
    action_dim: ClassVar[int] = 2

    def __post_init__(self) -> None:
        require(self.horizon >= 1, "dataset.horizon", self.horizon, ">= 1", "dataset.horizon=100")
        require_range("dataset.goal_range", self.goal_range, "dataset.goal_range=[-0.5,0.5]")
        require(
            self.max_action > 0, "dataset.max_action", self.max_action, "> 0",
            "dataset.max_action=0.1",
        )  # fmt: skip
        require(
            self.tolerance >= 0, "dataset.tolerance", self.tolerance, ">= 0",
            "dataset.tolerance=0.01",
        )  # fmt: skip

    def environment(self, device: torch.device) -> Navigation2D:
        return Navigation2D(self.horizon, self.max_action, self.tolerance, device)


@register("dataset", "navigation2d", Navigation2DConfig)
def build_navigation2d(config: Navigation2DConfig) -> TaskSources:
    tasks = GoalTasks(config.goal_range[0], config.goal_range[1])
    # One distribution: val and test tasks differ from training only by their fixed seeds.
    return TaskSources(train=tasks, val=tasks, test=tasks)
