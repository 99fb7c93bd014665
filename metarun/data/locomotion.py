"""MuJoCo locomotion tasks of Finn et al. 2017, Sec. 5.3, through gymnasium's ``HalfCheetah-v5``
(the optional extra: ``pip install 'metarun[rl]'``): ``halfcheetah_vel`` (run at a target
velocity drawn uniformly from [0, 2]) and ``halfcheetah_dir`` (run forward or backward).

Rewards as the authors' environments (cbfinn/maml_rl, ``rllab/envs/mujoco/
half_cheetah_env_rand.py`` and ``half_cheetah_env_rand_direc.py``): ``-|v - v_goal|`` or
``direction * v``, minus ``0.05 * |a|^2`` for the clipped action ``a``, with ``v`` the forward
velocity. The observation is gymnasium's (17 values: joint positions without the x position,
and velocities); rllab's also held the torso's centre of mass (20 values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from metarun.registry import register
from metarun.rl.env import RLDatasetSchema
from metarun.spec.checks import require, require_range
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch, TaskSources

INSTALL = "pip install 'metarun[rl]'"
ENV_ID = "HalfCheetah-v5"


def require_gymnasium(dataset: str) -> Any:
    """The ``gymnasium`` module with its MuJoCo environments.

    Raises:
        ConfigError: gymnasium or mujoco is not installed (the message names the install).
    """
    try:
        import gymnasium
        import gymnasium.envs.mujoco  # noqa: F401  (mujoco and the renderer's imports)
    except ImportError as error:
        raise ConfigError(
            f"dataset={dataset} needs gymnasium and mujoco, which are not installed "
            f"({error}); install them with: {INSTALL}"
        ) from None
    return gymnasium


def locomotion_reward(
    velocity: Tensor, goals: Tensor, actions: Tensor, *, direction: bool
) -> Tensor:
    """The authors' rewards: ``goal * v`` (direction) or ``-|v - goal|`` (velocity), minus
    ``0.05 * |a|^2`` (rllab's ``1e-1 * 0.5 * sum(a^2)``).

    Args:
        velocity: ``(B,)`` forward velocities; goals: ``(B,)``; actions: ``(B, A)`` clipped.
    """
    ctrl = 0.05 * actions.square().sum(-1)
    if direction:
        return goals * velocity - ctrl
    return -(velocity - goals).abs() - ctrl


class HalfCheetahTasks:
    """``T x N`` gymnasium HalfCheetah environments stepped in turn
    (:class:`metarun.rl.VectorEnv`); the task is a target velocity (``direction=False``) or a
    direction of +1 / -1 (``direction=True``)."""

    observation_dim = 17
    action_dim = 6

    def __init__(self, horizon: int, direction: bool, device: torch.device | str = "cpu") -> None:
        self.gym = require_gymnasium("halfcheetah_dir" if direction else "halfcheetah_vel")
        self.horizon = int(horizon)
        self.direction = bool(direction)
        self.device = torch.device(device)
        self._envs: list[Any] = []
        self._goals = torch.zeros(0)
        self._shape = (0, 0)

    def reset(self, tasks: Tensor, episodes: int, generator: torch.Generator) -> Tensor:
        t = tasks.shape[0]
        while len(self._envs) < t * episodes:
            # The raw environment: the wrappers' checks cost more than the physics here.
            self._envs.append(self.gym.make(ENV_ID).unwrapped)
        self._goals = tasks.reshape(t, 1).expand(t, episodes).reshape(-1).double().cpu()
        self._shape = (t, episodes)
        seeds = torch.randint(0, 2**31 - 1, (t * episodes,), generator=generator).tolist()
        obs = [env.reset(seed=seed)[0] for env, seed in zip(self._envs, seeds)]
        return self._tensor(obs)

    def _tensor(self, rows: list[Any]) -> Tensor:
        t, n = self._shape
        stacked = torch.from_numpy(np.stack(rows)).float()
        return stacked.reshape(t, n, -1).to(self.device)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t, n = self._shape
        clipped = actions.detach().reshape(t * n, -1).clamp(-1.0, 1.0).double().cpu()
        obs, velocity = [], []
        for env, action in zip(self._envs, clipped.numpy()):
            o, _, _, _, info = env.step(action)
            obs.append(o)
            velocity.append(float(info["x_velocity"]))
        v = torch.tensor(velocity, dtype=torch.float64)
        reward = locomotion_reward(v, self._goals, clipped, direction=self.direction)
        done = torch.zeros(t, n, dtype=torch.bool, device=self.device)
        return self._tensor(obs), reward.reshape(t, n).float().to(self.device), done


class VelocityTasks:
    """Target velocities uniform in ``[low, high]`` or, with ``direction``, directions +1 / -1
    with equal probability; per-task episode seeds as :mod:`metarun.rl.env` describes."""

    def __init__(self, low: float, high: float, direction: bool) -> None:
        self.low, self.high, self.direction = float(low), float(high), bool(direction)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.direction:
            goals = torch.randint(0, 2, (batch_size, 1), generator=generator).float() * 2 - 1
        else:
            goals = torch.rand(batch_size, 1, generator=generator)
            goals = goals.mul_(self.high - self.low).add_(self.low)
        seeds = torch.randint(0, 2**62, (2, batch_size), generator=generator)
        return TaskBatch(goals, seeds[0], goals.clone(), seeds[1])


@dataclass
class HalfCheetahVelConfig(RLDatasetSchema):
    """``dataset=halfcheetah_vel``: run at a target velocity (Finn et al. 2017, Sec. 5.3)."""

    horizon: int = 200
    velocity_range: list[float] = field(default_factory=lambda: [0.0, 2.0])

    observation_dim: ClassVar[int] = HalfCheetahTasks.observation_dim
    action_dim: ClassVar[int] = HalfCheetahTasks.action_dim
    direction: ClassVar[bool] = False

    def __post_init__(self) -> None:
        require(self.horizon >= 1, "dataset.horizon", self.horizon, ">= 1", "dataset.horizon=200")
        require_range("dataset.velocity_range", self.velocity_range, "dataset.velocity_range=[0,2]")

    def environment(self, device: torch.device) -> HalfCheetahTasks:
        return HalfCheetahTasks(self.horizon, self.direction, device)


@dataclass
class HalfCheetahDirConfig(HalfCheetahVelConfig):
    """``dataset=halfcheetah_dir``: run forward or backward (Finn et al. 2017, Sec. 5.3)."""

    direction: ClassVar[bool] = True


def _build(config: HalfCheetahVelConfig, name: str) -> TaskSources:
    # Only the environment needs gymnasium (algo=maml_rl builds it before the first step): the
    # goals are sampled without it.
    low, high = config.velocity_range
    tasks = VelocityTasks(low, high, config.direction)
    return TaskSources(train=tasks, val=tasks, test=tasks)


@register("dataset", "halfcheetah_vel", HalfCheetahVelConfig)
def build_halfcheetah_vel(config: HalfCheetahVelConfig) -> TaskSources:
    return _build(config, "halfcheetah_vel")


@register("dataset", "halfcheetah_dir", HalfCheetahDirConfig)
def build_halfcheetah_dir(config: HalfCheetahDirConfig) -> TaskSources:
    return _build(config, "halfcheetah_dir")
