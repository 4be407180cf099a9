"""MFEF's per-student map processing (``mfef``, METHODS.md section 3; our reading of the paper):
:class:`MultiScaleExtractor` (divide-and-concatenate over channels) then :class:`DualAttention`
(channel then spatial), together :class:`MFEFBlock`. Used by the method (:mod:`fusionkd.methods.mfef`) and
by its fused deployment (:mod:`fusionkd.methods.fused_deploy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import conv_bn_relu, init_weights

MODES = ("hierarchical", "pyramid")


class MultiScaleExtractor(nn.Module):
    """Divide-and-concatenate multi-scale extraction over channels (our reading of MFEF, Res2Net-like).

    ``(B, C, H, W) -> (B, C, H, W)``: split into ``s`` groups of ``C/s`` channels;
    ``hierarchical``: ``y_1 = x_1``, ``y_j = ReLU(BN(conv3x3(x_j + y_{j-1})))`` for ``j >= 2``;
    ``pyramid``: ``y_j = ReLU(BN(conv_{2j+1}(x_j)))`` (kernels 3, 5, 7, 9 for ``s = 4``, no hierarchy);
    then ``ReLU(BN(conv1x1(cat(y_1..y_s))) + x)``.

    Args:
        channels: ``C``; must be divisible by ``scales`` (equal groups keep ``x_j + y_{j-1}`` defined).
        scales: ``s``.
        mode: ``"hierarchical"`` or ``"pyramid"``.
    """

    def __init__(self, channels: int, scales: int = 4, mode: str = "hierarchical") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scales < 2 or channels % scales != 0:
            divisors = [d for d in range(2, min(channels, 16) + 1) if channels % d == 0]
            raise ValueError(
                f"MFEF splits a {channels}-channel map into scales={scales} equal channel groups; choose "
                f"scales >= 2 dividing {channels} (e.g. {divisors})"
            )
        self.mode = mode
        self.scales = scales
        self.width = channels // scales
        if mode == "hierarchical":
            self.convs = nn.ModuleList(conv_bn_relu(self.width, self.width, 3) for _ in range(scales - 1))
        else:
            kernels = [2 * j + 1 for j in range(1, scales + 1)]
            self.convs = nn.ModuleList(conv_bn_relu(self.width, self.width, k) for k in kernels)
        self.fuse = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.width, dim=1)
        if self.mode == "hierarchical":
            ys = [groups[0]]
            for conv, g in zip(self.convs, groups[1:]):
                ys.append(conv(g + ys[-1]))
        else:
            ys = [conv(g) for conv, g in zip(self.convs, groups)]
        return F.relu(self.bn(self.fuse(torch.cat(ys, dim=1))) + x)


class DualAttention(nn.Module):
    """Channel then spatial attention (CBAM-style; Woo et al., ECCV 2018), ``(B, C, H, W) -> (B, C, H, W)``.

    ``M_c = sigmoid(MLP(GAP(X)) + MLP(GMP(X)))`` with ``MLP = conv1x1(C -> h) -> ReLU -> conv1x1(h -> C)``,
    ``h = max(C // reduction, 4)``; ``X' = M_c * X``;
    ``M_s = sigmoid(conv_kxk([mean_c X'; max_c X']))``; output ``M_s * X'``.
    The convolutions have no bias (the sigmoid's offset is learnt nowhere else in CBAM's MLP either).

    Args:
        channels: ``C``.
        reduction: ``r`` (16).
        kernel_size: ``k`` of the spatial convolution (7).
    """

    MIN_HIDDEN = 4

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, self.MIN_HIDDEN)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        init_weights(self)

    def channel_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``M_c`` ``(B, C, 1, 1)``."""
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))

    def spatial_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``M_s`` ``(B, 1, H, W)``."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_mask(x)
        return x * self.spatial_mask(x)


class MFEFBlock(nn.Sequential):
    """One student's map processing before the fusion: :class:`MultiScaleExtractor` then
    :class:`DualAttention`, ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, scales: int = 4, mode: str = "hierarchical", reduction: int = 16
                 ) -> None:
        super().__init__(MultiScaleExtractor(channels, scales, mode), DualAttention(channels, reduction))
