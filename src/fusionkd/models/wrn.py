"""Wide ResNets (Zagoruyko & Komodakis 2016) as in RepDistiller's ``wrn.py``: ``wrn_D_K``.

Pre-activation basic blocks; a 3x3 conv stem to 16 channels, three stages of ``(D - 4) / 6`` blocks
with widths ``16K/32K/64K`` and strides 1/2/4, and the final BN-ReLU in the head's ``pre``. At 32x32,
WRN-40-2 gives maps 32x32x32, 64x16x16 and 128x8x8.

Stage maps (the backbone contract of :mod:`fusionkd.models.base`): a stage's raw output is a signed
residual sum; the map offered to methods is ``relu(bn(sum))``, the BN-ReLU that opens the next stage's first
block (``stages[i+1][0].bn1``) or the head's final BN-ReLU for the last stage. That is the per-stage
``relu(blockNbn(out))`` of the FRSKD authors' WRN, whose blocks moved exactly that BN out of the next block;
here it stays where RepDistiller's WRN has it (the same tensors in the same order, inside the next block),
and is computed once and shared by the method and the network. ``forward_stages(x, raw=True)`` gives the
raw sums (what RepDistiller's WRN returns with ``preact=False``).

The modules are RepDistiller's, but not their names: RepDistiller's state dict says ``conv1``,
``block1.layer.0.bn1``, ``convShortcut``, ``bn1`` and ``fc`` where this one says ``stem``,
``stages.0.0.bn1``, ``shortcut``, ``head.pre.0`` and ``head.fc``. Its files are read through the key map
of :mod:`fusionkd.models.community`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, ClassifierHead
from .layers import conv1x1, conv3x3, init_weights
from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block ``conv3x3(relu(bn(conv3x3(relu(bn(x)))))) + shortcut``.

    ``(B, in_planes, H, W) -> (B, out_planes, ceil(H / stride), ceil(W / stride))``. As in the
    reference code, the identity shortcut adds the raw input while the 1x1-conv projection (used when
    the width or the stride changes) sees the pre-activated input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.dropout = dropout
        self.shortcut = (
            None if in_planes == out_planes and stride == 1 else conv1x1(in_planes, out_planes, stride)
        )

    def forward(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the raw input; ``pre``: ``relu1(bn1(x))`` when the caller computed it already."""
        if pre is None:
            pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideStage(nn.Sequential):
    """The blocks of one WRN stage; it opens with its first block's BN-ReLU, which it exposes so that the
    previous stage's map is offered after it (``pre_activates``).

    ``forward(x)`` is the plain stage; ``forward(x, act)`` takes ``act = activate(x)`` already computed.
    """

    pre_activates = True

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn1(x))`` of the first block: the map the stage's first convolutions read."""
        first = self[0]
        return first.relu1(first.bn1(x))

    def forward(self, x: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
        blocks = list(self)
        x = blocks[0](x, pre=act)
        for block in blocks[1:]:
            x = block(x)
        return x


class WideResNet(Backbone):
    """WRN-``depth``-``widen``.

    Args:
        depth: total depth, ``6n + 4``.
        widen: width multiplier ``K``.
        num_classes: number of logits.
        in_chans: input image channels.
        dropout: dropout probability between the two convolutions of every block.

    Shapes: ``(B, in_chans, H, W)`` -> stage ``i``: ``(B, 16 K 2**i, ceil(H / 2**i), ceil(W / 2**i))``
    -> logits ``(B, num_classes)``.
    """

    def __init__(
        self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__(num_classes, in_chans)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen}")
        n = (depth - 4) // 6
        self.depth, self.widen = depth, widen
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = conv3x3(in_chans, 16)
        stages, in_planes = [], 16
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [WideBasicBlock(in_planes, width, stride, dropout)]
            blocks += [WideBasicBlock(width, width, 1, dropout) for _ in range(n - 1)]
            stages.append(WideStage(*blocks))
            in_planes = width
        self.stages = nn.ModuleList(stages)
        pre = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True))
        self.head = ClassifierHead(in_planes, num_classes, pre=pre, pre_activates=True)
        init_weights(self, zero_linear_bias=True)
        self._finish(widths, [1, 2, 4])


@register_model("wrn_16_1", "Wide ResNet-16-1 (3 stages 16/32/64, 0.18 M params at 100 classes)")
def wrn_16_1(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_chans, dropout)


@register_model("wrn_16_2", "Wide ResNet-16-2 (3 stages 32/64/128, 0.70 M params at 100 classes)")
def wrn_16_2(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_chans, dropout)


@register_model("wrn_40_1", "Wide ResNet-40-1 (3 stages 16/32/64, 0.57 M params at 100 classes)")
def wrn_40_1(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_chans, dropout)


@register_model("wrn_40_2", "Wide ResNet-40-2 (3 stages 32/64/128, 2.26 M params at 100 classes)")
def wrn_40_2(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_chans, dropout)
