"""``algo=fomaml``: first-order MAML, i.e. MAML with ``first_order=true``. The algorithm is
MAML's; the schema is its own so that checkpoints, results and ``mode=eval`` record
``algo=fomaml``.

References:
    Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    ICML 2017, Sec. 5.2.
"""

from __future__ import annotations

from dataclasses import dataclass

from metarun.algorithms.maml import MAML, MAMLConfig
from metarun.registry import register
from metarun.spec.errors import ConfigError


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


register("algo", "fomaml", FOMAMLConfig)(MAML)
