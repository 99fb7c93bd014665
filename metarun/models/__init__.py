"""Plain ``nn.Module`` s; no meta-learning logic lives in a model."""

from __future__ import annotations

from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP

__all__ = ["MLP", "Conv4"]

# Learning to reweight (Ren et al. 2018): the MNIST LeNet and the CIFAR residual networks.
from metarun.models.lenet import LeNet  # noqa: E402
from metarun.models.resnet import CifarResNet, WideResNet, resnet32, wrn28_10  # noqa: E402

__all__ += ["CifarResNet", "LeNet", "WideResNet", "resnet32", "wrn28_10"]

# Few-shot image benchmarks: MetaOptNet's ResNet-12 (Lee et al. 2019).
from metarun.models.resnet12 import ResNet12  # noqa: E402

__all__ += ["ResNet12"]
