"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019) and most few-shot work since."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING
from torch import Tensor, nn

from metarun.models.common import call_with_fields, conv3x3, require_at_least, require_sizes
from metarun.registry import register
from metarun.spec.bases import ModelSchema
from metarun.spec.checks import require

# Lee et al. 2019 (MetaOptNet), Sec. 4.1: 64-160-320-640 filters (Oreshkin et al. 2018 and the
# original ResNet-12 of TADAM: 64-128-256-512).
WIDTHS = (64, 160, 320, 640)


class ResidualBlock(nn.Module):
    """Three 3x3 conv + BatchNorm layers (LeakyReLU 0.1 between them and after the sum), a 1x1
    conv + BatchNorm shortcut, then 2x2 max-pooling: ``(B, C_in, H, W) -> (B, C_out, H/2, W/2)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.relu = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.pool(self.relu(h + self.shortcut(x)))


class ResNet12(nn.Module):
    """Four residual blocks (widths ``64-160-320-640`` as in MetaOptNet by default), global
    average pooling, then a linear classifier.

    84x84 inputs give 5x5 feature maps (84 -> 42 -> 21 -> 10 -> 5), 32x32 give 2x2; the average
    pooling makes the embedding ``widths[-1]``-dimensional for any image size (MetaOptNet
    flattens the 5x5 maps instead: ``avg_pool=False``). DropBlock and the wider 640-d embedding's
    regularisers of MetaOptNet are not included. The model changes no parameter in place (only
    BatchNorm buffers), so it runs under ``torch.func.functional_call`` and ``vmap``.

    Args:
        in_channels: image channels.
        num_classes: outputs of the classifier (``n_way``).
        widths: filters of the four blocks.
        image_size: side of the square inputs (sizes the classifier when ``avg_pool=False``).
        avg_pool: average the last feature maps (else flatten them).

    Raises:
        ValueError: a size below 1, not four widths, or an image too small for four poolings.

    References:
        Lee, Maji, Ravichandran, Soatto. Meta-Learning with Differentiable Convex Optimization.
        CVPR 2019, Sec. 4.1.
        Oreshkin, Rodriguez, Lacoste. TADAM: Task dependent adaptive metric for improved
        few-shot learning. NeurIPS 2018.

    Example:
        >>> ResNet12(num_classes=5, widths=(8, 8, 8, 8))(torch.zeros(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        widths: tuple[int, ...] = WIDTHS,
        image_size: int = 84,
        avg_pool: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet12 widths must be 4 positive numbers, got {list(widths)}")
        require_sizes(
            "ResNet12", in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
        side = image_size // 16
        if side < 1:
            raise ValueError(f"ResNet12 image_size={image_size} is too small (needs >= 16)")
        self.image_size = image_size
        channels = (in_channels, *widths)
        self.features = nn.Sequential(
            *(ResidualBlock(channels[i], channels[i + 1]) for i in range(4))
        )
        self.avg_pool = avg_pool
        features = widths[-1] if avg_pool else widths[-1] * side * side
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, S, S) -> (B, num_classes)`` logits."""
        h = self.features(x)  # (B, widths[-1], s, s)
        h = h.mean(dim=(2, 3)) if self.avg_pool else h.flatten(1)  # (B, D)
        return self.classifier(h)


@dataclass
class ResNet12Config(ModelSchema):
    """``model=resnet12``: MetaOptNet's ResNet-12 (Lee et al. 2019)."""

    in_channels: int = 3
    num_classes: int = MISSING  # conf/model/resnet12.yaml: ${dataset.n_way}
    widths: list[int] = field(default_factory=lambda: list(WIDTHS))
    image_size: int = MISSING  # conf/model/resnet12.yaml: ${dataset.image_size}
    avg_pool: bool = True

    def __post_init__(self) -> None:
        require_at_least(self, "in_channels", 1, 3)
        require_at_least(self, "num_classes", 2, 5)
        require(
            len(self.widths) == 4 and all(w >= 1 for w in self.widths),
            "model.widths",
            list(self.widths),
            "4 positive filter counts",
            "model.widths=[64,160,320,640]",
        )
        require_at_least(self, "image_size", 16, 84, ">= 16 (four 2x2 poolings)")


@register("model", "resnet12", ResNet12Config)
def build_resnet12(config: ResNet12Config) -> ResNet12:
    return call_with_fields(ResNet12, config, widths=tuple)
