"""Plain ``nn.Module`` s; no meta-learning logic lives in a model."""

from __future__ import annotations

from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP

__all__ = ["MLP", "Conv4"]
