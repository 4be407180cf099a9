"""CIFAR ResNets: ``resnet8/14/20/32/44/56/110``, ``resnet8x4``, ``resnet32x4``, ``resnet18`` and ``resnet50``.

* ``resnetN`` follow RepDistiller's ``resnet.py`` (He et al. 2016 CIFAR ResNets with a 1x1-conv-BN
  projection shortcut instead of option A's zero padding, hence 0.28 M rather than 0.27 M params for
  ResNet-20): a 3x3 conv-BN-ReLU stem and three stages of ``(N - 2) / 6`` basic blocks, widths
  16/32/64 (``x4``: stem 32, stages 64/128/256).
* ``resnet18`` and ``resnet50`` follow RepDistiller's ``resnetv2.py`` (the kuangliu CIFAR ResNets,
  ``ResNet18`` / ``ResNet50``): a 3x3 stride-1 stem without max-pool and four stages, of two basic blocks
  (widths 64/128/256/512) or of 3/4/6/3 bottleneck blocks (widths 256/512/1024/2048, the stride on the 3x3
  convolution).

The modules have other names than RepDistiller's (``stem`` / ``stages`` / ``head``), so its files are
read through the key map of :mod:`fusionkd.models.community`.

Stage ``i`` (0-based) has stride ``2 ** i`` relative to the input: at 32x32, ResNet-20 gives maps
16x32x32, 32x16x16 and 64x8x8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Backbone, ClassifierHead
from .layers import conv1x1, conv3x3, init_weights
from .registry import register_model


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``.

    ``(B, in_planes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``; the shortcut is a
    1x1-conv-BN projection when the stride or the width changes, else the identity.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """``relu(bn3(conv1x1(relu(bn2(conv3x3(relu(bn1(conv1x1(x)))))))) + shortcut(x))``, 4x expansion.

    ``(B, in_planes, H, W) -> (B, 4 planes, ceil(H / stride), ceil(W / stride))``; the stride is on the 3x3
    convolution and the shortcut is a 1x1-conv-BN projection when the stride or the width changes.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != out:
            self.shortcut: nn.Module = nn.Sequential(conv1x1(in_planes, out, stride), nn.BatchNorm2d(out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(Backbone):
    """Basic-block ResNet for small images: conv3x3-BN-ReLU stem, no max-pool, one stage per width.

    The first stage keeps the resolution, every later one halves it with a stride-2 first block.

    Args:
        num_blocks: number of blocks per stage.
        widths: width (``planes``) of the blocks of each stage; a stage outputs ``widths[i] * block.expansion``
            channels.
        stem_width: output channels of the stem convolution.
        num_classes: number of logits.
        in_chans: input image channels (1 for grey-scale, 3 for RGB).
        block: :class:`BasicBlock` or :class:`Bottleneck`.

    Shapes: ``(B, in_chans, H, W)`` -> stage ``i``: ``(B, widths[i] * block.expansion, ceil(H / 2**i),
    ceil(W / 2**i))`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        num_classes: int = 10,
        in_chans: int = 3,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
    ) -> None:
        super().__init__(num_classes, in_chans)
        if len(num_blocks) != len(widths) or not num_blocks or min(num_blocks) < 1:
            raise ValueError(f"need one positive block count per width, got {num_blocks} and {widths}")
        self.stem = nn.Sequential(
            conv3x3(in_chans, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        )
        stages, strides = [], []
        in_planes, total_stride = stem_width, 1
        for i, (n, width) in enumerate(zip(num_blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            total_stride *= stride
            blocks = [block(in_planes, width, stride)]
            blocks += [block(width * block.expansion, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            strides.append(total_stride)
            in_planes = width * block.expansion
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(in_planes, num_classes)
        init_weights(self)
        self._finish([w * block.expansion for w in widths], strides)


def cifar_resnet(depth: int, widths: Sequence[int], num_classes: int, in_chans: int) -> ResNet:
    """RepDistiller's CIFAR ResNet-``depth``; ``widths = (stem, stage1, stage2, stage3)``."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return ResNet([n, n, n], widths[1:], widths[0], num_classes=num_classes, in_chans=in_chans)


_BASE = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model("resnet8", "CIFAR ResNet-8 (3 stages 16/32/64, 0.08 M params at 100 classes)")
def resnet8(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(8, _BASE, num_classes, in_chans)


@register_model("resnet14", "CIFAR ResNet-14 (3 stages 16/32/64, 0.18 M params at 100 classes)")
def resnet14(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(14, _BASE, num_classes, in_chans)


@register_model("resnet20", "CIFAR ResNet-20 (3 stages 16/32/64, 0.28 M params at 100 classes)")
def resnet20(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(20, _BASE, num_classes, in_chans)


@register_model("resnet32", "CIFAR ResNet-32 (3 stages 16/32/64, 0.47 M params at 100 classes)")
def resnet32(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(32, _BASE, num_classes, in_chans)


@register_model("resnet44", "CIFAR ResNet-44 (3 stages 16/32/64, 0.67 M params at 100 classes)")
def resnet44(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(44, _BASE, num_classes, in_chans)


@register_model("resnet56", "CIFAR ResNet-56 (3 stages 16/32/64, 0.86 M params at 100 classes)")
def resnet56(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(56, _BASE, num_classes, in_chans)


@register_model("resnet110", "CIFAR ResNet-110 (3 stages 16/32/64, 1.74 M params at 100 classes)")
def resnet110(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(110, _BASE, num_classes, in_chans)


@register_model("resnet8x4", "CIFAR ResNet-8x4 (3 stages 64/128/256, 1.23 M params at 100 classes)")
def resnet8x4(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(8, _X4, num_classes, in_chans)


@register_model("resnet32x4", "CIFAR ResNet-32x4 (3 stages 64/128/256, 7.43 M params at 100 classes)")
def resnet32x4(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return cifar_resnet(32, _X4, num_classes, in_chans)


@register_model("resnet18", "CIFAR ResNet-18 (4 stages 64/128/256/512, 11.22 M params at 100 classes)")
def resnet18(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], 64, num_classes=num_classes, in_chans=in_chans)


@register_model("resnet50", "CIFAR ResNet-50, bottleneck (4 stages 256/512/1024/2048, 23.71 M params at 100 classes)")
def resnet50(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    return ResNet([3, 4, 6, 3], [64, 128, 256, 512], 64, num_classes=num_classes, in_chans=in_chans,
                  block=Bottleneck)
