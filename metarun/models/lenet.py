"""The small LeNet-style network of the class-imbalanced MNIST experiment (Ren et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from metarun.models.common import call_with_fields, linear_stack, require_at_least, require_sizes
from metarun.registry import register
from metarun.spec.bases import ModelSchema
from metarun.spec.enums import LeNetVariant

VARIANTS = ("ren2018", "lenet5")


def _ceil_half(size: int) -> int:
    return (size + 1) // 2


class LeNet(nn.Module):
    """A LeNet for 28x28 images.

    ``variant="ren2018"`` (default) is the "standard LeNet" of Ren et al. (2018, Sec. 5.1) as
    the official code builds it (``mnist/reweight.py``): three 5x5 'same' convolutions with 16,
    32 and 64 filters, each followed by ReLU and 3x3 max-pooling with stride 2
    (28 -> 14 -> 7 -> 4), then fully connected 1024 -> 100 -> ``num_classes``. The official
    network has one sigmoid logit; ``num_classes=2`` with softmax cross-entropy is the same
    model class (``num_classes=1`` gives the single logit). TensorFlow's 'SAME' pooling pads
    only bottom/right where ``MaxPool2d(3, 2, padding=1)`` pads both sides: same output sizes,
    windows shifted by one pixel.

    ``variant="lenet5"``: LeCun et al. (1998)'s layout with ReLU and max-pooling: 5x5 conv (6,
    padded) -> pool -> 5x5 conv (16) -> pool -> fc 400 -> 120 -> 84 -> ``num_classes``.

    No state besides the parameters, and no in-place operation, so the model runs under
    ``torch.func.functional_call`` with substituted parameters.

    Args:
        num_classes: outputs.
        in_channels: image channels.
        variant: ``"ren2018"`` or ``"lenet5"``.
        image_size: side of the square input images.

    Raises:
        ValueError: a size below 1, an unknown variant, or images too small.

    References:
        Ren, Zeng, Yang, Urtasun. Learning to Reweight Examples for Robust Deep Learning.
        ICML 2018, Sec. 5.1.
        LeCun, Bottou, Bengio, Haffner. Gradient-Based Learning Applied to Document
        Recognition. Proc. IEEE 1998.

    Example:
        >>> LeNet()(torch.zeros(8, 1, 28, 28)).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        variant: str = "ren2018",
        image_size: int = 28,
    ) -> None:
        super().__init__()
        require_sizes(
            "LeNet", num_classes=num_classes, in_channels=in_channels, image_size=image_size
        )
        if variant not in VARIANTS:
            raise ValueError(f"LeNet variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.variant = variant
        if variant == "ren2018":
            layers: list[nn.Module] = []
            channels = [in_channels, 16, 32, 64]
            side = image_size
            for fan_in, fan_out in zip(channels[:-1], channels[1:]):
                layers += [
                    nn.Conv2d(fan_in, fan_out, kernel_size=5, padding=2),
                    nn.ReLU(),
                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                ]
                side = _ceil_half(side)
            self.features = nn.Sequential(*layers)
            hidden: list[int] = [channels[-1] * side * side, 100]
        else:
            side = (image_size // 2 - 4) // 2
            if side < 1:
                raise ValueError(f"LeNet image_size={image_size} is too small for lenet5 (>= 12)")
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 16, kernel_size=5),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            hidden = [16 * side * side, 120, 84]
        self.classifier = linear_stack([*hidden, num_classes])

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, S, S) -> (B, num_classes)`` logits."""
        h = self.features(x)  # (B, 64, 4, 4) or (B, 16, 5, 5) at S = 28
        return self.classifier(h.flatten(1))  # (B, num_classes)


@dataclass
class LeNetConfig(ModelSchema):
    """``model=lenet``: the LeNet of the imbalanced-MNIST experiment (Ren et al. 2018)."""

    num_classes: int = 2
    in_channels: int = 1
    variant: LeNetVariant = LeNetVariant.ren2018
    image_size: int = 28

    def __post_init__(self) -> None:
        require_at_least(self, "num_classes", 2, 2)
        require_at_least(self, "in_channels", 1, 1)
        require_at_least(self, "image_size", 12, 28)


@register("model", "lenet", LeNetConfig)
def build_lenet(config: LeNetConfig) -> LeNet:
    return call_with_fields(LeNet, config, variant=lambda variant: variant.value)
