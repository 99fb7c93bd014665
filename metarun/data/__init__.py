"""Task samplers and data sets. Each dataset module also holds its ``dataset`` option (schema,
builder, compatibilities) and registers it on import (:mod:`metarun.registry`)."""

# Import order = registration order = the order help and error messages list options in.
# isort: skip_file

from __future__ import annotations

from metarun.data.fewshot import FewShotTasks, fixed_tasks
from metarun.data.sinusoid import SinusoidTasks
from metarun.data.omniglot import load_omniglot

__all__ = ["FewShotTasks", "SinusoidTasks", "fixed_tasks", "load_omniglot"]

# Learning to reweight (Ren et al. 2018): imbalanced MNIST and noisy-label CIFAR.
from metarun.data.mnist import load_mnist_imbalance  # noqa: E402
from metarun.data.cifar import background_flip, load_cifar_noisy, uniform_flip  # noqa: E402
from metarun.data.cifar_lt import load_cifar_lt  # noqa: E402  (Meta-Weight-Net's long tail)
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
    "load_cifar_lt",
    "load_cifar_noisy",
    "load_mnist_imbalance",
    "uniform_flip",
]

# Few-shot image benchmarks: miniImageNet, tieredImageNet, CIFAR-FS and FC100 (uint8 class pools).
from metarun.data.miniimagenet import load_miniimagenet  # noqa: E402
from metarun.data.tieredimagenet import load_tieredimagenet  # noqa: E402
from metarun.data.cifar_fs import load_cifar_fewshot  # noqa: E402

__all__ += ["load_cifar_fewshot", "load_miniimagenet", "load_tieredimagenet"]

# Your own images: a folder per class (metarun/data/image_folder.py).
from metarun.data.image_folder import load_image_folder  # noqa: E402

__all__ += ["load_image_folder"]
from metarun.data.torchvision_data import load_torchvision  # noqa: E402

__all__ += ["load_torchvision"]
from metarun.data import navigation2d  # noqa: E402,F401  (meta-RL environments)
from metarun.data import locomotion  # noqa: E402,F401  (MuJoCo: metarun[rl])
