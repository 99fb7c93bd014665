"""What an environment dataset gives the algorithm: a vectorised environment over tasks and
episodes, and the schema base that declares it.

A meta-RL dataset's :class:`~metarun.tasks.TaskBatch` holds tasks, not examples:
``support_x`` and ``query_x`` are the ``(T, task_dim)`` task parameters (a goal position, a
target velocity), ``support_y`` and ``query_y`` ``(T,)`` int64 seeds of the action noise of the
episodes sampled before and after adaptation. The seeds come from the runner's task generator,
so a resumed run samples the same episodes as an uninterrupted one, and evaluation tasks fixed
by a seed are fixed episodes too.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import Tensor

from metarun.spec.bases import DatasetSchema

#: The task kind of environment datasets: only meta-RL algorithms take them.
RL = "rl"


class VectorEnv(Protocol):
    """``T`` tasks times ``N`` episodes stepped at once.

    Attributes:
        observation_dim: size of an observation.
        action_dim: size of an action (the policy's output; the environment clips and scales).
        horizon: steps per episode.
    """

    observation_dim: int
    action_dim: int
    horizon: int

    def reset(self, tasks: Tensor, episodes: int, generator: torch.Generator) -> Tensor:
        """Start ``episodes`` episodes of each of the ``(T, task_dim)`` tasks (any randomness
        of the initial states from ``generator``); returns the first observations
        ``(T, N, observation_dim)``."""
        ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(T, N, action_dim)`` actions -> observations ``(T, N, observation_dim)``, rewards
        ``(T, N)`` and ``done`` flags ``(T, N)`` (bool: the episode ended with this step)."""
        ...


class RLDatasetSchema(DatasetSchema):
    """Schema base of an environment dataset: it builds the environment the algorithm samples
    episodes from (lazily, so that configs compose and models build without a simulator)."""

    task_kind: ClassVar[str] = RL
    task_type: ClassVar[str] = "reinforcement"
    models: ClassVar[tuple[str, ...]] = ("mlp",)
    #: Observation and action sizes, for the policy network's ``in_features`` / ``out_features``.
    observation_dim: ClassVar[int] = 0
    action_dim: ClassVar[int] = 0

    def environment(self, device: torch.device) -> VectorEnv:
        """A fresh vectorised environment on ``device``."""
        raise NotImplementedError

    def check_model(self, model: object) -> None:
        from metarun.registry import option_of
        from metarun.spec.checks import require

        name = option_of("dataset", self).name
        sizes = (
            ("in_features", self.observation_dim, "observation"),
            ("out_features", self.action_dim, "action"),
        )
        for key, size, what in sizes:
            value = getattr(model, key)
            require(
                value == size,
                f"model.{key}",
                value,
                f"{size} for dataset={name} (its {what} size)",
                f"model.{key}={size}",
            )
