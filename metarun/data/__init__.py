"""Task samplers and data sets; they depend on torch, torchvision and PIL only."""

from __future__ import annotations

from metarun.data.fewshot import FewShotTasks, fixed_tasks
from metarun.data.omniglot import load_omniglot
from metarun.data.sinusoid import SinusoidTasks

__all__ = ["FewShotTasks", "SinusoidTasks", "fixed_tasks", "load_omniglot"]
