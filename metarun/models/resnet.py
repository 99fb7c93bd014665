"""Residual networks for 32x32 images: the CIFAR ResNets of He et al. (2016) and the Wide ResNets
of Zagoruyko & Komodakis (2016), the two networks of Ren et al. (2018)'s CIFAR experiments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn

from metarun.models.common import call_with_fields, conv3x3, require_at_least
from metarun.registry import register
from metarun.spec.bases import ModelSchema
from metarun.spec.checks import require


def _init_weights(model: nn.Module) -> None:
    # He et al. 2015 ("MSRA") init for the convolutions, as both papers use; BN starts at identity.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _blocks_per_stage(model: str, depth: int, offset: int, example: int) -> int:
    """``n`` of a ``depth = 6n + offset`` network (``n >= 1``; else a ValueError)."""
    if depth < 6 + offset or (depth - offset) % 6:
        raise ValueError(
            f"{model} depth must be 6n + {offset} with n >= 1 (e.g. {example}), got {depth}"
        )
    return (depth - offset) // 6


def _stages(
    block: Callable[[int, int, int], nn.Module], channels: int, widths: Sequence[int], blocks: int
) -> tuple[list[nn.Module], int]:
    """One ``nn.Sequential`` of ``blocks`` residual units ``block(in, out, stride)`` per width
    (the first unit of every stage but the first has stride 2), and the channels they end with."""
    stages: list[nn.Module] = []
    for i, width in enumerate(widths):
        units = []
        for j in range(blocks):
            units.append(block(channels, width, 2 if i > 0 and j == 0 else 1))
            channels = width
        stages.append(nn.Sequential(*units))
    return stages, channels


class _PadShortcut(nn.Module):
    """Option A shortcut (He et al. 2016, Sec. 4.2): the identity, subsampled by ``stride`` and
    zero-padded with ``pad`` channels on each side; no parameters."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # (B, C + 2 pad, H/s, W/s)


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``: the original (post-activation)
    residual unit of two 3x3 convolutions, with an option A shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            if (out_channels - in_channels) % 2 or out_channels < in_channels:
                raise ValueError(
                    f"an option A shortcut pads channels evenly: cannot go from {in_channels} to "
                    f"{out_channels}"
                )
            self.shortcut: nn.Module = _PadShortcut(stride, (out_channels - in_channels) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # no in-place add: autograd of substituted params


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. (2016, Sec. 4.2): a 3x3 conv with 16 filters, three
    stages of ``n = (depth - 2) / 6`` basic blocks with 16, 32 and 64 filters (32x32, 16x16,
    8x8; the first block of stages 2 and 3 has stride 2), global average pooling and a linear
    classifier: ``6n + 2`` weighted layers.

    Shortcuts are option A (identity; where the shape changes, subsampled and zero-padded), the
    paper's choice on CIFAR, so the 0.46M parameters of ResNet-32 are all in the convolutions,
    batch norms and classifier. (The official L2RW TensorFlow code uses pre-activation units
    with an average-pooled, zero-padded shortcut instead: the same parameter count.)

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: outputs.
        in_channels: image channels.

    Raises:
        ValueError: ``depth`` not of the form ``6n + 2`` with ``n >= 1``, or a size below 1.

    References:
        He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016, Sec. 4.2.

    Example:
        >>> CifarResNet(32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        blocks = _blocks_per_stage("CifarResNet", depth, 2, 32)
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"CifarResNet num_classes and in_channels must be >= 1, got {num_classes} and "
                f"{in_channels}"
            )
        widths = (16, 32, 64)
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, _ = _stages(BasicBlock, widths[0], widths, blocks)
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, 32, 32) -> (B, num_classes)`` logits."""
        h = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        h = self.layer3(self.layer2(self.layer1(h)))  # (B, 64, 8, 8)
        return self.fc(h.mean(dim=(2, 3)))  # global average pool -> (B, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016): 5 blocks per stage, option A shortcuts,
    464,154 parameters with 10 classes."""
    return CifarResNet(depth=32, num_classes=num_classes)


class WideBlock(nn.Module):
    """Pre-activation wide residual unit, ``B(3,3)`` with dropout between the convolutions
    (Zagoruyko & Komodakis 2016, Sec. 2): ``conv(drop(relu(bn(conv(relu(bn(x))))))) +
    shortcut``; the shortcut is a 1x1 convolution of ``relu(bn(x))`` where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016): a 3x3 conv with 16 filters,
    three stages of ``n = (depth - 4) / 6`` pre-activation wide blocks with ``16k``, ``32k`` and
    ``64k`` filters (strides 1, 2, 2), then batch norm, ReLU, global average pooling and a
    linear classifier. Shortcuts are 1x1 convolutions where the shape changes (the reference
    implementation's); convolutions have no bias.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: ``k``.
        num_classes: outputs.
        dropout: dropout probability between the two convolutions of each block (the paper's
            CIFAR runs use 0.3; so does the official L2RW config for WRN-28-10).
        in_channels: image channels.

    Raises:
        ValueError: ``depth`` not ``6n + 4`` with ``n >= 1``, ``dropout`` outside ``[0, 1)``, or
            a size below 1.

    References:
        Zagoruyko, Komodakis. Wide Residual Networks. BMVC 2016.

    Example:
        >>> WideResNet(16, 2)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        blocks = _blocks_per_stage("WideResNet", depth, 4, 28)
        if widen_factor < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"WideResNet widen_factor, num_classes and in_channels must be >= 1, got "
                f"{widen_factor}, {num_classes} and {in_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(in_channels, 16)
        stages, channels = _stages(partial(WideBlock, dropout=dropout), 16, widths, blocks)
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, 32, 32) -> (B, num_classes)`` logits."""
        h = self.conv1(x)  # (B, 16, 32, 32)
        h = self.block3(self.block2(self.block1(h)))  # (B, 64k, 8, 8)
        h = F.relu(self.bn(h))
        return self.fc(h.mean(dim=(2, 3)))  # global average pool -> (B, num_classes)


def wrn28_10(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (Zagoruyko & Komodakis 2016): 4 blocks per stage, widths 160/320/640,
    36,479,194 parameters with 10 classes."""
    return WideResNet(depth=28, widen_factor=10, num_classes=num_classes, dropout=dropout)


@dataclass
class ResNet32Config(ModelSchema):
    """``model=resnet32``: the CIFAR ResNet-32 of He et al. 2016 (0.46M parameters)."""

    num_classes: int = MISSING  # conf/model/resnet32.yaml: ${dataset.num_classes}

    def __post_init__(self) -> None:
        require_at_least(self, "num_classes", 2, 10)


@dataclass
class WRN28_10Config(ModelSchema):
    """``model=wrn28_10``: WRN-28-10 (Zagoruyko & Komodakis 2016, 36.5M parameters)."""

    num_classes: int = MISSING  # conf/model/wrn28_10.yaml: ${dataset.num_classes}
    # Between the two convolutions of each block; 0.3 in the official L2RW WRN-28-10 config.
    dropout: float = 0.3

    def __post_init__(self) -> None:
        require_at_least(self, "num_classes", 2, 10)
        require(
            0.0 <= self.dropout < 1.0,
            "model.dropout",
            self.dropout,
            "in [0, 1)",
            "model.dropout=0.3",
        )


@register("model", "resnet32", ResNet32Config)
def build_resnet32(config: ResNet32Config) -> CifarResNet:
    return call_with_fields(resnet32, config)


@register("model", "wrn28_10", WRN28_10Config)
def build_wrn28_10(config: WRN28_10Config) -> WideResNet:
    return call_with_fields(wrn28_10, config)
