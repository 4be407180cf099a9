"""CIFAR MobileNetV2 as in RepDistiller's ``mobilenetv2.py`` (``mobile_half``: expansion 6, width 0.5).

A 3x3 stride-2 conv-BN-ReLU stem, the seven inverted-residual groups of Sandler et al. 2018
(``t, c, n, s``: ``1,16,1,1 / T,24,2,1 / T,32,3,2 / T,64,4,2 / T,96,3,1 / T,160,3,2 / T,320,1,1``,
widths scaled by ``width_mult``), a 1x1 conv-BN-ReLU to 1280 channels, global average pooling and one
linear layer. As in the reference, the first group (``t = 1``) still has its 1x1 expansion conv.

Stages end at resolution changes; they are RepDistiller's features ``f1 .. f4``, and the final 1x1
conv to 1280 channels is the head's ``pre`` (the modules are RepDistiller's, under other names: its files
are read through the key map of :mod:`fusionkd.models.community`):

=====  ==========  ========  ======  ===============
stage  groups      channels  stride  map at 32x32
=====  ==========  ========  ======  ===============
0      1, 2        12        2       12x16x16
1      3           16        4       16x8x8
2      4, 5        48        8       48x4x4
3      6, 7        160       16      160x2x2
=====  ==========  ========  ======  ===============
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, ClassifierHead
from .layers import conv_bn_relu, init_weights
from .registry import register_model

# t (expansion; None = the model's expand_ratio), c (width), n (blocks), s (stride of the first block)
_SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> 3x3 depthwise (stride) -> BN -> ReLU -> 1x1 project -> BN (+ x).

    ``(B, inp, H, W) -> (B, oup, ceil(H / stride), ceil(W / stride))``; the residual is used when
    ``stride == 1`` and ``inp == oup``.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(Backbone):
    """CIFAR MobileNetV2 (see the module docstring for the stage mapping).

    Args:
        num_classes: number of logits.
        in_chans: input image channels.
        width_mult: width multiplier of the stem and the inverted-residual groups (0.5 in the zoo).
        expand_ratio: expansion ``T`` of every group but the first.

    Shapes: ``(B, in_chans, H, W)`` -> stage maps at strides 2/4/8/16 -> ``pre``:
    ``(B, last_channel, h, w)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 0.5, expand_ratio: int = 6
    ) -> None:
        super().__init__(num_classes, in_chans)
        if width_mult <= 0 or expand_ratio < 1:
            raise ValueError(f"need width_mult > 0 and expand_ratio >= 1, got {width_mult}, {expand_ratio}")
        self.width_mult, self.expand_ratio = width_mult, expand_ratio
        #: blocks of each of the seven inverted-residual groups (RepDistiller's ``blocks.0 .. blocks.6``)
        self.group_sizes = [n for _, _, n, _ in _SETTING]
        in_channels = int(32 * width_mult)
        self.stem = conv_bn_relu(in_chans, in_channels, 3, stride=2)
        groups: list[list[nn.Module]] = []
        strides: list[int] = []
        total_stride = 2
        for t, c, n, s in _SETTING:
            out_channels = int(c * width_mult)
            blocks: list[nn.Module] = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_channels, out_channels, stride, t or expand_ratio))
                in_channels = out_channels
            total_stride *= s
            if s == 2 or not groups:  # a group that down-samples starts a new stage
                groups.append(blocks)
                strides.append(total_stride)
            else:
                groups[-1].extend(blocks)
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in groups)
        stage_channels = [stage[-1].conv[-1].num_features for stage in self.stages]
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        pre = conv_bn_relu(in_channels, self.last_channel, 1)
        self.head = ClassifierHead(in_channels, num_classes, pre=pre, features=self.last_channel)
        init_weights(self, linear_std=0.01)
        self._finish(stage_channels, strides)


@register_model(
    "mobilenetv2", "CIFAR MobileNetV2 x0.5, T=6 (4 stages 12/16/48/160, 0.81 M params at 100 classes)"
)
def mobilenetv2(
    num_classes: int = 10, in_chans: int = 3, width_mult: float = 0.5, expand_ratio: int = 6
) -> MobileNetV2:
    return MobileNetV2(num_classes, in_chans, width_mult, expand_ratio)
