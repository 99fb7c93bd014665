"""Diagonal Gaussian policies: log-densities and KL divergences (sums over action dimensions)."""

from __future__ import annotations

import math

from torch import Tensor


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """``log N(actions; mean, exp(log_std)^2)`` summed over the last dimension.

    Args:
        mean: ``(..., A)``; log_std: broadcastable to it; actions: ``(..., A)``.

    Returns:
        ``(...)``.
    """
    z = (actions - mean) * (-log_std).exp()
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """``KL(N0 || N1)`` of two diagonal Gaussians, summed over the last dimension: ``(...)``."""
    var0, var1 = (2 * log_std0).exp(), (2 * log_std1).exp()
    kl = log_std1 - log_std0 + (var0 + (mean0 - mean1).square()) / (2 * var1) - 0.5
    return kl.sum(-1)
