"""``mfef``: Multi-scale Feature Extraction and Fusion for online KD (Zou, Teng, Niu, ICANN 2022),
METHODS.md section 3.

**The layout is our reading of the paper** (its full text was not available; METHODS.md marks it
[design]): the paper's three components, multi-scale extraction by divide-and-concatenate over channels,
dual attention, and feature fusion into a fused classifier that assists the students, are built on FFL.

For each student ``k`` with last map ``X_k`` ``(B, C, H, W)``::

    x_1..x_s = split(X_k, s groups of C/s channels)          s = 4
    y_1 = x_1,  y_j = ReLU(BN(conv3x3(x_j + y_{j-1})))  j >= 2  (receptive field grows with j)
    E_k = ReLU(BN(conv1x1(cat(y_1..y_s))) + X_k)
    M_c = sigmoid(MLP(GAP(E_k)) + MLP(GMP(E_k))),  E' = M_c * E_k          (channel attention)
    M_s = sigmoid(conv7x7([mean_c E'; max_c E'])),  P_k = M_s * E'          (spatial attention)

then ``z_f = FusionModule(P_1..P_m)`` (FFL's, section 1) and FFL's loss with its ramp-up and T = 3::

    L = sum_k CE(z_k) + CE(z_f) + w(t) [ sum_k KL_3(z_f -> z_k) + KL_3(z_e -> z_f) ]
        (+ peer_kl * sum_k 1/(m-1) sum_{j != k} KL_1(z_j -> z_k), DML's terms, off by default)

The students' own logits ``z_k`` come from their own heads on the raw ``X_k``, so a deployed student is
the plain network. Heads: ``student1..studentm``, ``ensemble``, ``fused``. Deploy: the best student on
validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import conv_bn_relu, init_weights
from .base import MethodContext, register_method
from .dml import mutual_kl
from .ffl import FusionOnlineMethod, _check_common
from .fused_deploy import FusedDeployment, check_deploy
from .fusion import fusion_mutual_loss
from .peers import PeerNetworks, check_peer_count, resolve_peer_names

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


@register_method("mfef", "Multi-scale extraction + dual attention + FFL fusion (our reading of MFEF)")
class MFEF(FusedDeployment, FusionOnlineMethod):
    accepts_models = True
    head_prefix = "student"

    @dataclass
    class Options:
        """Options of ``mfef``."""

        students: int | None = None  #: number of students, 2 to 16 (default 2, or the length of ``models``)
        shared_trunk: bool = False  #: share all stages but the last (FFL-S layout)
        scales: int = 4  #: channel groups s of the multi-scale extraction
        mode: str = "hierarchical"  #: "hierarchical" (y_j sees y_{j-1}) or "pyramid" (kernels 3, 5, 7, 9)
        reduction: int = 16  #: channel-attention reduction r (hidden width max(C // r, 4))
        temperature: float = 3.0  #: T of FFL's KL terms
        rampup_epochs: float | None = None  #: R of the sigmoid ramp-up (default 80/300 of the epochs)
        fusion_weight_decay: float = 1e-5  #: weight decay of the MFEF blocks + fusion module
        peer_kl: float = 0.0  #: weight of DML's peer KL terms between students (0: off, 1: DML's terms)
        batched_peers: bool = False  #: run same-architecture students as one vmap-ed computation
        deploy: str = "best_peer"  #: "best_peer" (one student) or "fused" (all + MFEF blocks + fusion module)

        def validate(self) -> None:
            check_deploy("mfef", self.deploy, shared_trunk=self.shared_trunk)
            check_peer_count(self.students, "students")
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
            if self.scales < 2:
                raise ValueError(f"scales must be at least 2, got {self.scales}")
            if self.reduction < 1:
                raise ValueError(f"reduction must be at least 1, got {self.reduction}")
            if self.peer_kl < 0:
                raise ValueError(f"peer_kl must not be negative, got {self.peer_kl}")
            _check_common(self.temperature, self.rampup_epochs, self.fusion_weight_decay)

    def __init__(self, ctx: MethodContext, options: Options | None = None) -> None:
        super().__init__(ctx, options)
        o = self.options
        o.validate()
        names = resolve_peer_names(ctx, o.students, option="students")
        self.peers = PeerNetworks(ctx, names, shared_trunk=o.shared_trunk, batched=o.batched_peers)
        self.peers.require_same_map_size("mfef")
        post = nn.ModuleList(MFEFBlock(c, o.scales, o.mode, o.reduction) for c in self.peers.last_channels)
        self._build_fusion(ctx, post)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int
                      ) -> dict[str, torch.Tensor]:
        logits, fused = self._forward(images)
        terms = fusion_mutual_loss(logits, fused, labels, self.rampup_weight(epoch), self.options.temperature)
        if self.options.peer_kl > 0:
            terms["loss_kl_peer"] = self.options.peer_kl * mutual_kl(logits, 1.0)
        return terms
