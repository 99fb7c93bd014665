"""Meta-reinforcement learning parts: vectorised environments as task distributions, episode
sampling, advantages with a linear-feature baseline, Gaussian policies and the TRPO / PPO outer
steps of MAML-RL (Finn et al. 2017, Sec. 5.3). Imports torch only.

The algorithm is :mod:`metarun.algorithms.maml_rl`; the environments are the datasets
:mod:`metarun.data.navigation2d` and :mod:`metarun.data.locomotion`.
"""

from __future__ import annotations

from metarun.rl.env import RL, RLDatasetSchema, VectorEnv
from metarun.rl.episodes import Batch, Episodes, process, sample_episodes
from metarun.rl.outer import OuterStep, ppo_step, trpo_step
from metarun.rl.policy import gaussian_kl, gaussian_log_prob

__all__ = [
    "RL",
    "Batch",
    "Episodes",
    "OuterStep",
    "RLDatasetSchema",
    "VectorEnv",
    "gaussian_kl",
    "gaussian_log_prob",
    "ppo_step",
    "process",
    "sample_episodes",
    "trpo_step",
]
