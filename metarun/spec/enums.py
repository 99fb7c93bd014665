"""Every choice a config key offers, as an Enum, in one torch-free module: schemas and the code
they configure (e.g. ``metarun.algorithms.maml``) take them from here, so a member has one name.
"""

from __future__ import annotations

from enum import Enum


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
    """Meta-learned inner learning rates: none, one scalar, one per parameter element (Meta-SGD,
    Li et al. 2017), or one per parameter tensor and inner step (MAML++'s LSLR, Antoniou et al.
    2019)."""

    off = "off"
    scalar = "scalar"
    per_param = "per_param"
    per_layer_per_step = "per_layer_per_step"


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
