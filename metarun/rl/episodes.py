"""Episodes sampled from a vectorised environment, and what the policy-gradient losses read from
them: advantages from discounted returns, a linear-feature baseline fitted per task, and GAE.

References:
    Duan, Chen, Houthooft, Schulman & Abbeel, "Benchmarking Deep Reinforcement Learning for
    Continuous Control", ICML 2016 (rllab: the linear-feature baseline MAML-RL uses).
    Schulman, Moritz, Levine, Jordan & Abbeel, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", ICLR 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from metarun.rl.env import VectorEnv

#: ``obs (T, N, O) -> (mean (T, N, A), log_std broadcastable to it)``.
PolicyFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Episodes:
    """``N`` episodes of each of ``T`` tasks, ``H`` steps long.

    Attributes:
        observations: ``(T, N, H, O)`` the observation each action was taken in.
        actions: ``(T, N, H, A)`` the sampled (unclipped) actions.
        rewards: ``(T, N, H)``, 0 after an episode ended.
        mask: ``(T, N, H)`` 1.0 for the steps taken, 0.0 after the episode ended.
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    def returns(self) -> Tensor:
        """The mean undiscounted return of each task's episodes: ``(T,)``."""
        return self.rewards.sum(-1).mean(-1)


class Batch(NamedTuple):
    """One set of episodes as the losses read it, flattened over episodes and steps (a pytree,
    so ``torch.func.vmap`` maps it over tasks).

    Attributes:
        observations: ``(T, N*H, O)``; actions: ``(T, N*H, A)``; advantages: ``(T, N*H)``
        (normalised per task); mask: ``(T, N*H)``.
    """

    observations: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor


@torch.no_grad()
def sample_episodes(
    env: VectorEnv,
    policy: PolicyFn,
    tasks: Tensor,
    episodes: int,
    generator: torch.Generator,
) -> Episodes:
    """Roll out ``episodes`` episodes per task with Gaussian actions, all tasks at once.

    The action noise is drawn on the CPU from ``generator`` alone (then moved to the tasks'
    device), so the episodes depend only on the policy, the tasks and the generator's state.
    """
    obs = env.reset(tasks, episodes, generator)  # (T, N, O)
    t, n = obs.shape[:2]
    alive = torch.ones(t, n, dtype=obs.dtype, device=obs.device)
    observations, actions, rewards, masks = [], [], [], []
    for _ in range(env.horizon):
        mean, log_std = policy(obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        action = mean + log_std.exp() * noise.to(mean.device)
        next_obs, reward, done = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward * alive)
        masks.append(alive)
        alive = alive * (~done).to(alive.dtype)
        obs = next_obs
    return Episodes(
        torch.stack(observations, 2),
        torch.stack(actions, 2),
        torch.stack(rewards, 2),
        torch.stack(masks, 2),
    )


def discounted_returns(rewards: Tensor, discount: float) -> Tensor:
    """Rewards-to-go ``G_t = r_t + discount * G_{t+1}`` along the last dimension."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for step in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., step] + discount * running
        out[..., step] = running
    return out


def linear_baseline(
    observations: Tensor, mask: Tensor, targets: Tensor, reg: float = 1e-5
) -> Tensor:
    """Values from a ridge regression fitted per task on the features ``[o, o^2, t, t^2, t^3,
    1]`` (observations clipped to [-10, 10], ``t`` the step / 100), as rllab's
    ``LinearFeatureBaseline``; fitted in float64 on the valid steps.

    Args:
        observations: ``(T, N, H, O)``; mask: ``(T, N, H)``; targets: ``(T, N, H)`` returns.

    Returns:
        ``(T, N, H)`` fitted values (0 where ``mask`` is 0), in the dtype of ``targets``.
    """
    t, n, h, _ = observations.shape
    obs = observations.double().clamp(-10, 10)
    steps = torch.arange(h, dtype=torch.float64, device=obs.device).div(100)
    steps = steps.view(1, 1, h, 1).expand(t, n, h, 1)
    feats = torch.cat([obs, obs.square(), steps, steps**2, steps**3, torch.ones_like(steps)], -1)
    feats = feats * mask.double().unsqueeze(-1)  # invalid steps: rows of zeros
    f = feats.reshape(t, n * h, -1)  # (T, NH, F)
    y = (targets.double() * mask.double()).reshape(t, n * h, 1)
    gram = f.transpose(1, 2) @ f  # (T, F, F)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + reg * eye, f.transpose(1, 2) @ y)  # (T, F, 1)
    return (f @ coef).reshape(t, n, h).to(targets.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, discount: float, lam: float) -> Tensor:
    """Generalised advantage estimates along the last dimension (the value after an episode's
    last step is 0: ``mask`` of the next step)."""
    next_values = torch.cat(
        [values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], -1
    )
    deltas = (rewards + discount * next_values - values) * mask
    return discounted_returns(deltas, discount * lam) * mask


def process(episodes: Episodes, discount: float, gae_lambda: float) -> Batch:
    """Advantages of the episodes (baseline fitted on these same episodes, per task), normalised
    to mean 0 and std 1 over each task's valid steps (rllab's ``center_adv``)."""
    mask = episodes.mask
    values = linear_baseline(
        episodes.observations, mask, discounted_returns(episodes.rewards, discount)
    )
    adv = gae(episodes.rewards, values, mask, discount, gae_lambda)
    count = mask.sum((1, 2), keepdim=True)
    mean = adv.sum((1, 2), keepdim=True) / count
    var = ((adv - mean).square() * mask).sum((1, 2), keepdim=True) / count
    adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
    t, n, h = mask.shape
    return Batch(
        episodes.observations.reshape(t, n * h, -1),
        episodes.actions.reshape(t, n * h, -1),
        adv.reshape(t, n * h),
        mask.reshape(t, n * h),
    )
