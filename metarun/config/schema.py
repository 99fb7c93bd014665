"""Typed schemas of every configuration option: one dataclass per YAML file under ``conf/``.

Hydra merges each YAML onto its schema, so a mistyped key, a value of the wrong type or an unknown
enum member fails at compose time with the full key. ``__post_init__`` holds the semantic checks;
it runs when :func:`metarun.config.validate` turns the composed config into these dataclasses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from metarun.config.errors import ConfigError

# ----------------------------------------------------------------------------------------- enums


class Mode(str, Enum):
    """What ``metarun`` does: meta-train then test, or only test a checkpoint."""

    train = "train"
    eval = "eval"


class OptimizerName(str, Enum):
    adam = "adam"
    sgd = "sgd"


class ScheduleName(str, Enum):
    """Learning-rate schedule of ``meta_optimizer`` over the outer steps."""

    constant = "constant"
    step = "step"  # times gamma at each of the milestones (torch.optim.lr_scheduler.MultiStepLR)
    cosine = "cosine"  # cosine from lr down to min_lr at outer_steps (CosineAnnealingLR)


class InnerLR(str, Enum):
    """Meta-learned inner learning rates: none, one scalar, or one per parameter tensor (Meta-SGD
    style, Li et al. 2017)."""

    off = "off"
    scalar = "scalar"
    per_param = "per_param"


class BNPolicy(str, Enum):
    """Batch norm statistics during adaptation and prediction. ``batch_stats`` is what the MAML
    reference code does (transductive: statistics of the current batch, also at test time)."""

    batch_stats = "batch_stats"
    running_stats = "running_stats"


class TaskBatching(str, Enum):
    """How a meta-batch is computed: ``loop`` (task after task, least memory), ``vmap`` (tasks
    at once with ``torch.func.vmap``, ``algo.task_chunk_size`` at a time; needs
    ``bn_policy=batch_stats``) or ``auto`` (measure both and vmap chunk sizes on a meta-batch at
    start-up, take the fastest within ``algo.memory_budget_mb``)."""

    loop = "loop"
    vmap = "vmap"
    auto = "auto"


class OmniglotSplit(str, Enum):
    finn = "finn"
    lake = "lake"
    random = "random"


class MnistSourceSplit(str, Enum):
    """Official MNIST file the imbalanced training pool and clean set come from (``test``: only
    the 10,000 test images are needed, and the balanced test set comes from them too)."""

    train = "train"
    test = "test"


class NoiseType(str, Enum):
    """Label noise of the CIFAR training pool (Ren et al. 2018, Sec. 5.2): ``uniform`` flips to
    any other class, ``background`` to one background class."""

    uniform = "uniform"
    background = "background"


class LeNetVariant(str, Enum):
    """``ren2018``: the L2RW paper's LeNet (official code); ``lenet5``: LeCun et al. 1998."""

    ren2018 = "ren2018"
    lenet5 = "lenet5"


# ---------------------------------------------------------------------------------------- checks


def _require(ok: bool, key: str, value: Any, requirement: str, example: str) -> None:
    """Unless ``ok``, raise :class:`ConfigError`
    ``"<key> must be <requirement>, got <value> (set e.g. <example>)"``."""
    if not ok:
        raise ConfigError(f"{key} must be {requirement}, got {value!r} (set e.g. {example})")


def _require_range(key: str, value: list[float], example: str) -> None:
    _require(
        len(value) == 2 and value[0] <= value[1],
        key,
        list(value),
        "[low, high] with low <= high",
        example,
    )


def _require_optional_count(key: str, value: int | None, example: str) -> None:
    _require(value is None or value >= 1, key, value, ">= 1 or null", example)


# ------------------------------------------------------------------------------------ algorithms


@dataclass
class MAMLConfig:
    """``algo=maml``: Finn et al. 2017, second-order unless ``first_order``."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    # Adaptation steps at validation/test time; the paper uses more than in training on Omniglot.
    eval_inner_steps: int = "${.inner_steps}"  # type: ignore[assignment]  # interpolation
    first_order: bool = False
    # True: the model's weights get no meta-gradient (only e.g. learned inner lrs are meta-learned).
    copy_initial_weights: bool = False
    learn_inner_lr: InnerLR = InnerLR.off
    bn_policy: BNPolicy = BNPolicy.batch_stats
    # auto: measured at start-up (vmap wins for small models, the loop for conv nets with many
    # queries on a CPU); loop: the least memory.
    task_batching: TaskBatching = TaskBatching.auto
    task_chunk_size: int | None = None  # tasks per vmapped chunk; null = the whole meta-batch
    memory_budget_mb: float | None = None  # task_batching=auto: skip faster but bigger choices
    # Recompute inner forwards in the meta-backward: less memory on long unrolls (loop only).
    checkpoint_inner: bool = False

    def __post_init__(self) -> None:
        _require(self.inner_lr > 0, "algo.inner_lr", self.inner_lr, "> 0", "algo.inner_lr=0.01")
        _require(
            self.inner_steps >= 1,
            "algo.inner_steps",
            self.inner_steps,
            ">= 1",
            "algo.inner_steps=5",
        )
        _require(
            self.eval_inner_steps >= 0,
            "algo.eval_inner_steps",
            self.eval_inner_steps,
            ">= 0",
            "algo.eval_inner_steps=10",
        )
        _require_optional_count(
            "algo.task_chunk_size", self.task_chunk_size, "algo.task_chunk_size=8"
        )
        _require(
            self.memory_budget_mb is None or self.memory_budget_mb > 0,
            "algo.memory_budget_mb",
            self.memory_budget_mb,
            "> 0 or null",
            "algo.memory_budget_mb=4000",
        )
        if self.checkpoint_inner and self.task_batching is TaskBatching.vmap:
            raise ConfigError(
                "algo.checkpoint_inner=true needs algo.task_batching=loop or auto, got "
                "algo.task_batching=vmap (torch.func transforms do not support activation "
                "checkpointing; auto uses the loop)"
            )
        if self.task_batching is TaskBatching.vmap and self.bn_policy is not BNPolicy.batch_stats:
            raise ConfigError(
                f"algo.task_batching=vmap needs algo.bn_policy=batch_stats, got "
                f"algo.bn_policy={self.bn_policy.value} (tasks computed at once cannot share "
                "running statistics; set algo.task_batching=loop)"
            )


@dataclass
class FOMAMLConfig(MAMLConfig):
    """``algo=fomaml``: first-order MAML (Finn et al. 2017, Sec. 5.2), i.e. MAML without
    second derivatives."""

    first_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.first_order:
            raise ConfigError(
                "algo.first_order must be true for algo=fomaml, got False "
                "(use algo=maml for second-order MAML)"
            )


@dataclass
class ERMConfig:
    """``algo=erm``: plain training with uniform example weights, the baseline of Ren et al.
    2018; same model, optimizer (``meta_optimizer``) and schedule as ``algo=l2rw``."""

    # Also train on the clean set (appended to every training batch): the fair baseline of an
    # algo=l2rw run with clean_as_train=true.
    clean_as_train: bool = False


@dataclass
class L2RWConfig(ERMConfig):
    """``algo=l2rw``: learning to reweight examples (Ren et al. 2018, Algorithm 1). Each step
    weights the training batch by how a look-ahead step of the training optimizer
    (``meta_optimizer``) on each example changes the loss on the clean set."""

    # Learning rate of the look-ahead step; null = the optimizer's own (meta_optimizer.lr).
    lookahead_lr: float | None = None

    def __post_init__(self) -> None:
        _require(
            self.lookahead_lr is None or self.lookahead_lr > 0,
            "algo.lookahead_lr",
            self.lookahead_lr,
            "> 0 or null (null = meta_optimizer.lr)",
            "algo.lookahead_lr=0.001",
        )


# -------------------------------------------------------------------------------------- datasets


@dataclass
class SinusoidConfig:
    """``dataset=sinusoid``: regression on ``A sin(x - phase)`` (Finn et al. 2017, Sec. 5.1)."""

    k_shot: int = 10
    k_query: int = 10
    # Support/query sizes of validation and test tasks; null = same as training.
    eval_k_shot: int | None = None
    eval_k_query: int | None = None
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])

    task_type = "regression"  # class attribute, not a config key

    def __post_init__(self) -> None:
        _require(self.k_shot >= 1, "dataset.k_shot", self.k_shot, ">= 1", "dataset.k_shot=10")
        _require(self.k_query >= 1, "dataset.k_query", self.k_query, ">= 1", "dataset.k_query=10")
        _require_optional_count("dataset.eval_k_shot", self.eval_k_shot, "dataset.eval_k_shot=5")
        _require_optional_count(
            "dataset.eval_k_query", self.eval_k_query, "dataset.eval_k_query=10"
        )
        _require_range("dataset.amplitude", self.amplitude, "dataset.amplitude=[0.1,5.0]")
        _require_range("dataset.phase", self.phase, "dataset.phase=[0,3.14159]")
        _require_range("dataset.x_range", self.x_range, "dataset.x_range=[-5,5]")


@dataclass
class OmniglotConfig:
    """``dataset=omniglot``: N-way K-shot character classification (Finn et al. 2017, Sec. 5.2)."""

    root: str = "${oc.env:METARUN_DATA,data}/omniglot"
    split: OmniglotSplit = OmniglotSplit.finn
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 1
    download: bool = False
    rotations: bool = True
    image_size: int = 28
    cache_dir: str | None = None
    n_way: int = 5
    k_shot: int = 1
    # 15 query examples per class during meta-training, as in the MAML reference code.
    k_query: int = 15
    eval_k_shot: int | None = None
    eval_k_query: int | None = None

    task_type = "classification"  # class attribute, not a config key

    def __post_init__(self) -> None:
        _require(self.n_way >= 2, "dataset.n_way", self.n_way, ">= 2", "dataset.n_way=5")
        _require(self.k_shot >= 1, "dataset.k_shot", self.k_shot, ">= 1", "dataset.k_shot=1")
        _require(self.k_query >= 1, "dataset.k_query", self.k_query, ">= 1", "dataset.k_query=15")
        _require_optional_count("dataset.eval_k_shot", self.eval_k_shot, "dataset.eval_k_shot=1")
        _require_optional_count(
            "dataset.eval_k_query", self.eval_k_query, "dataset.eval_k_query=15"
        )
        _require(
            self.image_size >= 4,
            "dataset.image_size",
            self.image_size,
            ">= 4",
            "dataset.image_size=28",
        )
        _require(
            len(self.fractions) == 3
            and all(f >= 0 for f in self.fractions)
            and abs(sum(self.fractions) - 1.0) < 1e-6,
            "dataset.fractions",
            list(self.fractions),
            "3 non-negative numbers (train, val, test) summing to 1",
            "dataset.fractions=[0.7,0.15,0.15]",
        )


@dataclass
class MnistImbalanceConfig:
    """``dataset=mnist_imbalance``: binary 4-vs-9 MNIST with a training pool dominated by the 9s,
    a small balanced clean set and a balanced test set (Ren et al. 2018, Sec. 5.1)."""

    root: str = "${oc.env:METARUN_DATA,data}"  # holds mnist/raw/ (or MNIST/raw/) IDX files
    pos_ratio: float = 0.995  # fraction of the dominant digit in the training pool
    n_train: int = 5000
    n_val: int = 10  # clean set, n_val/2 per digit: L2RW's meta-objective (query each step)
    n_test: int | None = 500  # balanced; null = the largest the remaining images allow
    digits: list[int] = field(default_factory=lambda: [4, 9])  # (minority, dominant)
    # test: everything from the 10,000 test images (machines without the training file).
    source_split: MnistSourceSplit = MnistSourceSplit.train
    download: bool = False
    seed: int = 0  # which images land in which pool (not the training seed)
    batch_size: int = 100  # training examples per step

    task_type = "classification"  # class attribute, not a config key

    def __post_init__(self) -> None:
        _require(
            0.5 <= self.pos_ratio < 1.0,
            "dataset.pos_ratio",
            self.pos_ratio,
            "in [0.5, 1)",
            "dataset.pos_ratio=0.995",
        )
        _require(self.n_train >= 1, "dataset.n_train", self.n_train, ">= 1", "dataset.n_train=5000")
        _require(
            self.n_val >= 2 and self.n_val % 2 == 0,
            "dataset.n_val",
            self.n_val,
            "an even number >= 2 (n_val/2 images per digit)",
            "dataset.n_val=10",
        )
        _require(
            self.n_test is None or (self.n_test >= 2 and self.n_test % 2 == 0),
            "dataset.n_test",
            self.n_test,
            "null or an even number >= 2 (n_test/2 images per digit)",
            "dataset.n_test=500",
        )
        _require(
            len(self.digits) == 2
            and self.digits[0] != self.digits[1]
            and all(0 <= d <= 9 for d in self.digits),
            "dataset.digits",
            list(self.digits),
            "two different digits 0..9 (minority, dominant)",
            "dataset.digits=[4,9]",
        )
        _require(
            1 <= self.batch_size <= self.n_train,
            "dataset.batch_size",
            self.batch_size,
            f"in [1, dataset.n_train={self.n_train}]",
            "dataset.batch_size=100",
        )


@dataclass
class Cifar10NoisyConfig:
    """``dataset=cifar10_noisy``: CIFAR-10 with label noise on the training pool and a small
    clean set taken out of it (Ren et al. 2018, Sec. 5.2)."""

    root: str = "${oc.env:METARUN_DATA,data}"  # holds cifar-10-batches-py/ (or cifar10/...)
    num_classes: int = 10  # fixed by the option: 10 here, 100 for dataset=cifar100_noisy
    noise: float = 0.4  # fraction of training labels flipped
    noise_type: NoiseType = NoiseType.uniform
    background: int | None = None  # noise_type=background: the class; null = drawn with seed
    n_clean: int = 1000  # clean set, class-balanced, taken out of the training images
    download: bool = False
    seed: int = 0  # clean split and noise (not the training seed)
    batch_size: int = 100  # training examples per step
    # Clean examples per step (the official code's bsize_b); null = the whole clean set.
    clean_batch_size: int | None = 100
    # Random crops after zero padding, and left-right mirroring, of the training and clean
    # batches (Ren et al. 2018 pad 32 -> 36, crop 32); validation and test images never.
    augment: bool = True
    crop_padding: int = 2  # pixels per side (4 is the common ResNet setting)

    task_type = "classification"  # class attributes, not config keys
    _classes = 10  # the classes this option stands for

    def __post_init__(self) -> None:
        other_classes = 100 if self._classes == 10 else 10
        option, other = f"cifar{self._classes}_noisy", f"cifar{other_classes}_noisy"
        if self.num_classes != self._classes:
            raise ConfigError(
                f"dataset.num_classes must be {self._classes} for dataset={option}, got "
                f"{self.num_classes} (the option fixes it: leave it out, or use "
                f"dataset={other} for CIFAR-{other_classes})"
            )
        _require(
            0.0 <= self.noise <= 1.0, "dataset.noise", self.noise, "in [0, 1]", "dataset.noise=0.4"
        )
        _require(
            self.background is None or 0 <= self.background < self.num_classes,
            "dataset.background",
            self.background,
            f"null or a class in [0, {self.num_classes})",
            "dataset.background=null",
        )
        _require(self.n_clean >= 1, "dataset.n_clean", self.n_clean, ">= 1", "dataset.n_clean=1000")
        _require(
            self.batch_size >= 1,
            "dataset.batch_size",
            self.batch_size,
            ">= 1",
            "dataset.batch_size=100",
        )
        _require(
            self.clean_batch_size is None or 1 <= self.clean_batch_size <= self.n_clean,
            "dataset.clean_batch_size",
            self.clean_batch_size,
            f"null or in [1, dataset.n_clean={self.n_clean}]",
            "dataset.clean_batch_size=100",
        )
        _require(
            0 <= self.crop_padding <= 16,
            "dataset.crop_padding",
            self.crop_padding,
            "in [0, 16] (pixels per side)",
            "dataset.crop_padding=2",
        )


@dataclass
class Cifar100NoisyConfig(Cifar10NoisyConfig):
    """``dataset=cifar100_noisy``: CIFAR-100 (fine labels), otherwise as ``cifar10_noisy``."""

    num_classes: int = 100

    _classes = 100


# ---------------------------------------------------------------------------------------- models


@dataclass
class MLPConfig:
    """``model=mlp``: fully connected ReLU network (Finn et al. 2017: 2 hidden layers of 40)."""

    in_features: int = 1
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    out_features: int = 1

    def __post_init__(self) -> None:
        _require(
            self.in_features >= 1,
            "model.in_features",
            self.in_features,
            ">= 1",
            "model.in_features=1",
        )
        _require(
            self.out_features >= 1,
            "model.out_features",
            self.out_features,
            ">= 1",
            "model.out_features=1",
        )
        _require(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            list(self.hidden),
            "a list of positive widths",
            "model.hidden=[40,40]",
        )


@dataclass
class Conv4Config:
    """``model=conv4``: four 3x3 conv blocks (Vinyals et al. 2016; Finn et al. 2017)."""

    in_channels: int = 1
    num_classes: int = MISSING  # conf/model/conv4.yaml: ${dataset.n_way}
    hidden: int = 64
    image_size: int = MISSING  # conf/model/conv4.yaml: ${dataset.image_size}
    batch_norm: bool = True
    # Finn et al. 2017, App. A.1: strided convolutions instead of max-pooling on Omniglot.
    max_pool: bool = False

    def __post_init__(self) -> None:
        _require(
            self.in_channels >= 1,
            "model.in_channels",
            self.in_channels,
            ">= 1",
            "model.in_channels=1",
        )
        _require(
            self.num_classes >= 2,
            "model.num_classes",
            self.num_classes,
            ">= 2",
            "model.num_classes=5",
        )
        _require(self.hidden >= 1, "model.hidden", self.hidden, ">= 1", "model.hidden=64")
        _require(
            self.image_size >= 4,
            "model.image_size",
            self.image_size,
            ">= 4",
            "model.image_size=28",
        )


@dataclass
class LeNetConfig:
    """``model=lenet``: the LeNet of the imbalanced-MNIST experiment (Ren et al. 2018)."""

    num_classes: int = 2
    in_channels: int = 1
    variant: LeNetVariant = LeNetVariant.ren2018
    image_size: int = 28

    def __post_init__(self) -> None:
        _require(
            self.num_classes >= 2,
            "model.num_classes",
            self.num_classes,
            ">= 2",
            "model.num_classes=2",
        )
        _require(
            self.in_channels >= 1,
            "model.in_channels",
            self.in_channels,
            ">= 1",
            "model.in_channels=1",
        )
        _require(
            self.image_size >= 12,
            "model.image_size",
            self.image_size,
            ">= 12",
            "model.image_size=28",
        )


@dataclass
class ResNet32Config:
    """``model=resnet32``: the CIFAR ResNet-32 of He et al. 2016 (0.46M parameters)."""

    num_classes: int = MISSING  # conf/model/resnet32.yaml: ${dataset.num_classes}

    def __post_init__(self) -> None:
        _require(
            self.num_classes >= 2,
            "model.num_classes",
            self.num_classes,
            ">= 2",
            "model.num_classes=10",
        )


@dataclass
class WRN28_10Config:
    """``model=wrn28_10``: WRN-28-10 (Zagoruyko & Komodakis 2016, 36.5M parameters)."""

    num_classes: int = MISSING  # conf/model/wrn28_10.yaml: ${dataset.num_classes}
    # Between the two convolutions of each block; 0.3 in the official L2RW WRN-28-10 config.
    dropout: float = 0.3

    def __post_init__(self) -> None:
        _require(
            self.num_classes >= 2,
            "model.num_classes",
            self.num_classes,
            ">= 2",
            "model.num_classes=10",
        )
        _require(
            0.0 <= self.dropout < 1.0,
            "model.dropout",
            self.dropout,
            "in [0, 1)",
            "model.dropout=0.3",
        )


# ------------------------------------------------------------------------------------ top level


@dataclass
class MetaOptimizerConfig:
    """The outer-loop optimizer over ``algorithm.meta_parameters()``."""

    name: OptimizerName = OptimizerName.adam
    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: ScheduleName = ScheduleName.constant
    milestones: list[int] = field(default_factory=list)  # schedule=step: outer steps
    gamma: float = 0.1  # schedule=step: factor at each milestone
    min_lr: float = 0.0  # schedule=cosine: the rate reached at outer_steps

    def __post_init__(self) -> None:
        _require(self.lr > 0, "meta_optimizer.lr", self.lr, "> 0", "meta_optimizer.lr=0.001")
        milestones = list(self.milestones)
        _require(
            all(m >= 1 for m in milestones) and milestones == sorted(set(milestones)),
            "meta_optimizer.milestones",
            milestones,
            "increasing outer steps >= 1",
            "meta_optimizer.milestones=[40000,60000]",
        )
        _require(
            self.schedule is not ScheduleName.step or bool(milestones),
            "meta_optimizer.milestones",
            milestones,
            "non-empty for meta_optimizer.schedule=step",
            "meta_optimizer.milestones=[40000,60000]",
        )
        _require(
            self.gamma > 0, "meta_optimizer.gamma", self.gamma, "> 0", "meta_optimizer.gamma=0.1"
        )
        _require(
            0 <= self.min_lr <= self.lr,
            "meta_optimizer.min_lr",
            self.min_lr,
            f"in [0, meta_optimizer.lr={self.lr}]",
            "meta_optimizer.min_lr=0",
        )
        _require(
            self.weight_decay >= 0,
            "meta_optimizer.weight_decay",
            self.weight_decay,
            ">= 0",
            "meta_optimizer.weight_decay=0",
        )
        _require(
            self.momentum >= 0,
            "meta_optimizer.momentum",
            self.momentum,
            ">= 0",
            "meta_optimizer.momentum=0.9",
        )


@dataclass
class EvalConfig:
    """Validation during training and the final test."""

    every: int = 500  # validate every N outer steps; 0 = never
    val_tasks: int = 100
    num_tasks: int = 600  # test tasks; 600 as in Finn et al. 2017
    batch_size: int = 25  # tasks per evaluate() call (memory, not results)
    # Adaptation steps at val/test; null = algo.eval_inner_steps.
    inner_steps: int | None = None
    # Also test after each of these step counts (Finn et al. 2017, Fig. 2: 1..10 steps).
    curve_steps: list[int] = field(default_factory=list)
    # Fixed seeds: the same val/test tasks for every run, whatever the training seed.
    val_seed: int = 1000
    test_seed: int = 2000
    use_best: bool = False  # test the best-validation weights instead of the last ones

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", self.every, ">= 0 (0 = never)", "eval.every=500")
        _require(
            self.val_tasks >= 1, "eval.val_tasks", self.val_tasks, ">= 1", "eval.val_tasks=100"
        )
        _require(
            self.num_tasks >= 1, "eval.num_tasks", self.num_tasks, ">= 1", "eval.num_tasks=600"
        )
        _require(
            self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1", "eval.batch_size=25"
        )
        _require(
            self.inner_steps is None or self.inner_steps >= 0,
            "eval.inner_steps",
            self.inner_steps,
            ">= 0 or null",
            "eval.inner_steps=10",
        )
        _require(
            all(s >= 0 for s in self.curve_steps),
            "eval.curve_steps",
            list(self.curve_steps),
            "a list of step counts >= 0",
            "eval.curve_steps=[1,5,10]",
        )


@dataclass
class LogConfig:
    """Scalars to TensorBoard and ``metrics.jsonl``, progress bar to stderr."""

    every: int = 100
    tensorboard: bool = True
    progress: bool = True  # tqdm bar (only shown on a terminal)
    hypergrad_layers: bool = True  # one hypergrad/<name> norm per parameter tensor

    def __post_init__(self) -> None:
        _require(self.every >= 1, "log.every", self.every, ">= 1", "log.every=100")


@dataclass
class SaveConfig:
    """Checkpoints under ``<run dir>/checkpoints/``: ``last.pt`` and ``best.pt``."""

    every: int = 1000  # also always at the end; 0 = only at the end
    keep_best: bool = True  # best.pt by val accuracy (val loss for regression)

    def __post_init__(self) -> None:
        _require(self.every >= 0, "save.every", self.every, ">= 0", "save.every=1000")


_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+")


@dataclass
class RunConfig:
    """The whole run. ``algo``, ``dataset`` and ``model`` are filled from their config groups."""

    algo: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    name: str = "run"  # run dir: outputs/<name>/<time>; conf/config.yaml sets <algo>_<dataset>
    mode: Mode = Mode.train
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = cuda if available
    outer_steps: int = 20000  # the default run: about 1.5 minutes on a 2-core CPU
    meta_batch_size: int = 25
    meta_optimizer: MetaOptimizerConfig = field(default_factory=MetaOptimizerConfig)
    grad_clip: float | None = None  # max global norm of the meta-gradient; null = no clipping
    # Outer steps with a non-finite meta-loss or meta-gradient skipped (no meta-optimizer step)
    # before training stops as diverged; 0 = stop at the first.
    max_nonfinite_steps: int = 0
    # Meta-batches sampled ahead in a background thread (0 = in the loop); results are the same.
    prefetch: int = 2
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    # Continue from <run dir>/checkpoints/last.pt (rerun with hydra.run.dir=<that run dir>).
    resume: bool = False
    checkpoint: str | None = None  # mode=eval: the checkpoint file to test

    def __post_init__(self) -> None:
        _require(
            _DEVICE.fullmatch(self.device) is not None,
            "device",
            self.device,
            "auto, cpu, cuda or cuda:N",
            "device=cpu",
        )
        _require(self.outer_steps >= 1, "outer_steps", self.outer_steps, ">= 1", "outer_steps=1000")
        _require(
            self.meta_batch_size >= 1,
            "meta_batch_size",
            self.meta_batch_size,
            ">= 1",
            "meta_batch_size=25",
        )
        _require(self.prefetch >= 0, "prefetch", self.prefetch, ">= 0", "prefetch=2")
        _require(
            self.max_nonfinite_steps >= 0,
            "max_nonfinite_steps",
            self.max_nonfinite_steps,
            ">= 0 (0 = stop at the first non-finite step)",
            "max_nonfinite_steps=0",
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            self.grad_clip,
            "> 0 or null",
            "grad_clip=10",
        )
        if self.mode is Mode.eval and not self.checkpoint:
            raise ConfigError(
                "checkpoint must be set with mode=eval, got None "
                "(set e.g. checkpoint=outputs/<run>/checkpoints/best.pt)"
            )
        if self.mode is Mode.train and self.checkpoint:
            raise ConfigError(
                f"checkpoint is only read with mode=eval, got checkpoint={self.checkpoint!r} with "
                "mode=train (add mode=eval to test it; to continue training a run use "
                "resume=true hydra.run.dir=<its run dir>)"
            )
        _check_algo_fits_dataset(self.algo, self.dataset, self.meta_batch_size)
        _check_model_values(self.model, self.dataset)


# Example-reweighting algorithms train on a supervised data set; meta-learners on tasks.
_REWEIGHTING = (ERMConfig,)  # L2RWConfig is a subclass
_SUPERVISED = (MnistImbalanceConfig, Cifar10NoisyConfig)  # Cifar100NoisyConfig is a subclass


def _check_algo_fits_dataset(algo: Any, dataset: Any, meta_batch_size: int) -> None:
    """Reweighting algorithms (``l2rw``, ``erm``) need a supervised dataset and one training
    batch per step; the meta-learners need task datasets."""
    reweighting = isinstance(algo, _REWEIGHTING)
    if reweighting != isinstance(dataset, _SUPERVISED):
        algo_name, dataset_name = option_name("algo", algo), option_name("dataset", dataset)

        def fitting(group: str, base: tuple[type, ...], fits: bool) -> str:
            names = [n for n, s in SCHEMAS[group].items() if issubclass(s, base) == fits]
            return ", ".join(f"{group}={n}" for n in names[:-1]) + f" or {group}={names[-1]}"

        raise ConfigError(
            f"algo={algo_name} does not fit dataset={dataset_name} (dataset={dataset_name} takes "
            f"{fitting('algo', _REWEIGHTING, not reweighting)}; algo={algo_name} takes "
            f"{fitting('dataset', _SUPERVISED, reweighting)})"
        )
    if reweighting and meta_batch_size != 1:
        raise ConfigError(
            f"meta_batch_size must be 1 for algo={option_name('algo', algo)} (one training batch "
            f"per step; its size is dataset.batch_size), got {meta_batch_size} "
            "(set meta_batch_size=1)"
        )


def check_model_fits_dataset(model_type: type, dataset_type: type) -> None:
    """Cross-group check on the chosen options, before any value is resolved (a conv4 model on
    sinusoid would otherwise fail as an unresolvable ``${dataset.n_way}``)."""
    fits: dict[type, tuple[type, ...]] = {
        SinusoidConfig: (MLPConfig,),
        OmniglotConfig: (Conv4Config,),
        MnistImbalanceConfig: (LeNetConfig,),
        Cifar10NoisyConfig: (ResNet32Config, WRN28_10Config),
        Cifar100NoisyConfig: (ResNet32Config, WRN28_10Config),
    }
    wanted = fits.get(dataset_type)
    if wanted is not None and model_type not in wanted:
        dataset = _option_of_type("dataset", dataset_type)
        use = " or ".join(f"model={_option_of_type('model', w)}" for w in wanted)
        raise ConfigError(
            f"model={_option_of_type('model', model_type)} does not fit dataset={dataset} "
            f"(use {use})"
        )


def _check_model_values(model: Any, dataset: Any) -> None:
    """Cross-group checks on values: the model's input and output must match the tasks."""
    check_model_fits_dataset(type(model), type(dataset))
    if isinstance(dataset, SinusoidConfig):
        for key in ("in_features", "out_features"):
            value = getattr(model, key)
            _require(value == 1, f"model.{key}", value, "1 for dataset=sinusoid", f"model.{key}=1")
    elif isinstance(dataset, OmniglotConfig):
        _require(
            model.num_classes == dataset.n_way,
            "model.num_classes",
            model.num_classes,
            f"equal to dataset.n_way ({dataset.n_way})",
            "model.num_classes=${dataset.n_way}",
        )
        _require(
            model.image_size == dataset.image_size,
            "model.image_size",
            model.image_size,
            f"equal to dataset.image_size ({dataset.image_size})",
            "model.image_size=${dataset.image_size}",
        )
        _require(
            model.in_channels == 1,
            "model.in_channels",
            model.in_channels,
            "1 for dataset=omniglot (grayscale)",
            "model.in_channels=1",
        )
    elif isinstance(dataset, MnistImbalanceConfig):
        for key, value in (("num_classes", 2), ("in_channels", 1), ("image_size", 28)):
            _require(
                getattr(model, key) == value,
                f"model.{key}",
                getattr(model, key),
                f"{value} for dataset=mnist_imbalance",
                f"model.{key}={value}",
            )
    elif isinstance(dataset, Cifar10NoisyConfig):
        _require(
            model.num_classes == dataset.num_classes,
            "model.num_classes",
            model.num_classes,
            f"equal to dataset.num_classes ({dataset.num_classes})",
            "model.num_classes=${dataset.num_classes}",
        )


# ------------------------------------------------------------------------------------- registry

#: Every option of every config group and its schema. ``metarun.config.store`` registers them,
#: checkpoints record the option names so a saved config can be re-typed without Hydra.
SCHEMAS: dict[str, dict[str, type]] = {
    "algo": {"maml": MAMLConfig, "fomaml": FOMAMLConfig, "l2rw": L2RWConfig, "erm": ERMConfig},
    "dataset": {
        "sinusoid": SinusoidConfig,
        "omniglot": OmniglotConfig,
        "mnist_imbalance": MnistImbalanceConfig,
        "cifar10_noisy": Cifar10NoisyConfig,
        "cifar100_noisy": Cifar100NoisyConfig,
    },
    "model": {
        "mlp": MLPConfig,
        "conv4": Conv4Config,
        "lenet": LeNetConfig,
        "resnet32": ResNet32Config,
        "wrn28_10": WRN28_10Config,
    },
}


def _option_of_type(group: str, schema: type) -> str:
    for name, option_schema in SCHEMAS[group].items():
        if option_schema is schema:
            return name
    return schema.__name__


def option_name(group: str, node: Any) -> str:
    """The option of ``group`` (e.g. ``"maml"``) whose schema is exactly ``type(node)``."""
    return _option_of_type(group, type(node))
