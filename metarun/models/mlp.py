"""Fully connected network, the MAML sinusoid regressor by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from metarun.models.common import call_with_fields, linear_stack, require_at_least
from metarun.registry import register
from metarun.spec.bases import ModelSchema
from metarun.spec.checks import require


class MLP(nn.Module):
    """``Linear -> ReLU -> ... -> Linear``: ``hidden`` sizes between ``in_features`` and
    ``out_features``, no activation on the output.

    Args:
        in_features: input size.
        hidden: sizes of the hidden layers (may be empty: a linear model).
        out_features: output size.

    References:
        Finn, Abbeel, Levine. Model-Agnostic Meta-Learning. ICML 2017, Sec. 5.1: two hidden layers
        of 40 units with ReLU for sinusoid regression.

    Example:
        >>> MLP()(torch.zeros(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(
        self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1
    ) -> None:
        super().__init__()
        sizes = [int(in_features), *(int(h) for h in hidden), int(out_features)]
        if any(s < 1 for s in sizes):
            raise ValueError(
                f"model sizes must be >= 1, got in_features={in_features}, hidden={list(hidden)}, "
                f"out_features={out_features}"
            )
        self.layers = linear_stack(sizes)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        return self.layers(x)


@dataclass
class MLPConfig(ModelSchema):
    """``model=mlp``: fully connected ReLU network (Finn et al. 2017: 2 hidden layers of 40)."""

    in_features: int = 1
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    out_features: int = 1

    def __post_init__(self) -> None:
        require_at_least(self, "in_features", 1, 1)
        require_at_least(self, "out_features", 1, 1)
        require(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            list(self.hidden),
            "a list of positive widths",
            "model.hidden=[40,40]",
        )


@register("model", "mlp", MLPConfig)
def build_mlp(config: MLPConfig) -> MLP:
    return call_with_fields(MLP, config, hidden=tuple)
