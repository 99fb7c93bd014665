"""``algo=metasgd``: Meta-SGD, i.e. MAML with a meta-learned inner learning rate for every weight
(elementwise, ``learn_inner_lr=per_param``). The algorithm is MAML's; only the schema is its own,
so that checkpoints, results and ``mode=eval`` record and accept ``algo=metasgd`` (a YAML that
reused MAML's schema would be recorded as ``algo=maml``: options are recorded by schema type).

References:
    Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metarun.algorithms.maml import MAML, MAMLConfig
from metarun.registry import register
from metarun.spec.enums import InnerLR
from metarun.spec.errors import ConfigError


@dataclass
class MetaSGDConfig(MAMLConfig):
    """``algo=metasgd``: MAML's keys; the inner rates are learned per parameter element."""

    chosen_defaults: ClassVar[dict[str, str]] = {
        "inner_steps": "Li et al. 2017 adapt with one step",
        "eval_inner_steps": "Li et al. 2017 adapt with one step",
    }

    # The inner rate's initial value is the data's (adapt.inner_lr); the steps are Meta-SGD's.
    inner_steps: int = 1
    eval_inner_steps: int = 1
    learn_inner_lr: InnerLR = InnerLR.per_param

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learn_inner_lr is not InnerLR.per_param:
            raise ConfigError(
                f"algo.learn_inner_lr must be per_param for algo=metasgd, got "
                f"{self.learn_inner_lr.value} (use algo=maml algo.learn_inner_lr="
                f"{self.learn_inner_lr.value})"
            )


register("algo", "metasgd", MetaSGDConfig)(MAML)
