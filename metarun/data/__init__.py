"""Task samplers and data sets; they depend on torch, torchvision and PIL only."""

from __future__ import annotations

from metarun.data.fewshot import FewShotTasks, fixed_tasks
from metarun.data.omniglot import load_omniglot
from metarun.data.sinusoid import SinusoidTasks

__all__ = ["FewShotTasks", "SinusoidTasks", "fixed_tasks", "load_omniglot"]

# Learning to reweight (Ren et al. 2018): imbalanced MNIST and noisy-label CIFAR.
from metarun.data.cifar import background_flip, load_cifar_noisy, uniform_flip  # noqa: E402
from metarun.data.mnist import load_mnist_imbalance  # noqa: E402
from metarun.data.supervised import (  # noqa: E402
    ExampleSet,
    ReweightingTasks,
    SplitData,
    random_crop_flip,
)

__all__ += [
    "ExampleSet",
    "ReweightingTasks",
    "random_crop_flip",
    "SplitData",
    "background_flip",
    "load_cifar_noisy",
    "load_mnist_imbalance",
    "uniform_flip",
]
