"""``algo=mamlpp``: MAML++ (Antoniou, Edwards & Storkey 2019), i.e. MAML with its options on.
The algorithm is MAML's, composing :mod:`metarun.algorithms.stepwise`; the schema is its own so
that checkpoints, results and ``mode=eval`` record ``algo=mamlpp``.

References:
    Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, Sec. 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metarun.algorithms.maml import MAML, MAMLConfig
from metarun.registry import register
from metarun.spec.enums import InnerLR


@dataclass
class MAMLPPConfig(MAMLConfig):
    """``algo=mamlpp``: MAML++ (Antoniou, Edwards & Storkey 2019), i.e. MAML with its options
    on: the multi-step loss, per-layer per-step learned inner rates and per-step BatchNorm
    weights and statistics, over 5 inner steps. Derivative-order annealing needs the run's
    length (``algo.first_order_until``; the ``omniglot_mamlpp_*`` presets set it). Its own schema
    so that checkpoints and results record ``algo=mamlpp``; every key is MAML's and each option
    can be turned off."""

    chosen_defaults: ClassVar[dict[str, str]] = {
        "inner_steps": "Antoniou et al. 2019: 5 inner steps in training and at test"
    }

    inner_steps: int = 5
    eval_inner_steps: int = "${.inner_steps}"  # type: ignore[assignment]  # interpolation
    learn_inner_lr: InnerLR = InnerLR.per_layer_per_step
    multi_step_loss: bool = True
    per_step_bn: bool = True


register("algo", "mamlpp", MAMLPPConfig)(MAML)
