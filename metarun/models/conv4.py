"""The four-block convolutional network of few-shot image classification (Vinyals et al. 2016;
Finn et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING
from torch import Tensor, nn

from metarun.models.common import call_with_fields, require_at_least, require_sizes
from metarun.registry import register
from metarun.spec.bases import ModelSchema


def _block(in_channels: int, hidden: int, batch_norm: bool, max_pool: bool) -> nn.Sequential:
    # Finn et al. 2017, Sec. 5.2: on Omniglot strided convolutions replace max-pooling.
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, hidden, kernel_size=3, stride=1 if max_pool else 2, padding=1)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(hidden))
    layers.append(nn.ReLU())
    if max_pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def feature_size(image_size: int, max_pool: bool, blocks: int = 4) -> int:
    """Side of the last feature map: stride-2 'same' convs ceil-halve, 2x2 max-pools floor-halve
    (28 -> 14 -> 7 -> 4 -> 2 strided; 84 -> 42 -> 21 -> 10 -> 5 pooled)."""
    size = image_size
    for _ in range(blocks):
        size = size // 2 if max_pool else (size - 1) // 2 + 1
    return size


class Conv4(nn.Module):
    """Four blocks of 3x3 conv (``hidden`` filters) + BatchNorm + ReLU, then a linear classifier.

    ``max_pool=False`` (Omniglot): each conv has stride 2. ``max_pool=True`` (MiniImagenet):
    stride 1 followed by 2x2 max-pooling. The model holds no state besides the BatchNorm buffers
    and changes no parameter in place, so it runs under ``torch.func.functional_call``.

    Args:
        in_channels: image channels.
        num_classes: outputs (``n_way``).
        hidden: filters per conv.
        image_size: side of the square input images.
        batch_norm: add ``BatchNorm2d`` (running statistics tracked) after each conv.
        max_pool: the max-pooling variant instead of strided convs.

    Raises:
        ValueError: a size below 1, or an ``image_size`` too small for four halvings.

    References:
        Finn, Abbeel, Levine. Model-Agnostic Meta-Learning. ICML 2017, Sec. 5.2 and App. A.1.
        Vinyals et al. Matching Networks for One Shot Learning. NeurIPS 2016.

    Example:
        >>> Conv4(num_classes=5)(torch.zeros(8, 1, 28, 28)).shape
        torch.Size([8, 5])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        batch_norm: bool = True,
        max_pool: bool = False,
    ) -> None:
        super().__init__()
        require_sizes(
            "Conv4",
            in_channels=in_channels,
            num_classes=num_classes,
            hidden=hidden,
            image_size=image_size,
        )
        side = feature_size(image_size, max_pool)
        if side < 1:
            raise ValueError(
                f"Conv4 image_size={image_size} is too small for four max-pooled blocks "
                f"(needs >= 16)"
            )
        self.image_size = image_size
        self.features = nn.Sequential(
            *(
                _block(in_channels if i == 0 else hidden, hidden, batch_norm, max_pool)
                for i in range(4)
            )
        )
        self.classifier = nn.Linear(hidden * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, S, S) -> (B, num_classes)`` logits."""
        h = self.features(x)  # (B, hidden, s, s)
        return self.classifier(h.flatten(1))  # (B, num_classes)


@dataclass
class Conv4Config(ModelSchema):
    """``model=conv4``: four 3x3 conv blocks (Vinyals et al. 2016; Finn et al. 2017)."""

    in_channels: int = 1
    num_classes: int = MISSING  # conf/model/conv4.yaml: ${dataset.n_way}
    hidden: int = 64
    image_size: int = MISSING  # conf/model/conv4.yaml: ${dataset.image_size}
    batch_norm: bool = True
    # Finn et al. 2017, App. A.1: strided convolutions instead of max-pooling on Omniglot.
    max_pool: bool = False

    def __post_init__(self) -> None:
        require_at_least(self, "in_channels", 1, 1)
        require_at_least(self, "num_classes", 2, 5)
        require_at_least(self, "hidden", 1, 64)
        require_at_least(self, "image_size", 4, 28)


@register("model", "conv4", Conv4Config)
def build_conv4(config: Conv4Config) -> Conv4:
    return call_with_fields(Conv4, config)
