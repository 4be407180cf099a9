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
from torch import nn

from .base import MethodContext, register_method
from .dml import mutual_kl
from .fused_deploy import FusedDeployment, check_deploy
from .fusion import fusion_mutual_loss
from .fusion_online import FusionOnlineMethod, check_fusion_options
from .mfef_blocks import MODES, DualAttention, MFEFBlock, MultiScaleExtractor
from .peers import PeerNetworks, check_peer_count, resolve_peer_names

__all__ = ["MFEF", "MODES", "DualAttention", "MFEFBlock", "MultiScaleExtractor"]


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
        logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024) (all KL terms)
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
            check_fusion_options(self.temperature, self.rampup_epochs, self.fusion_weight_decay)

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
        terms = fusion_mutual_loss(logits, fused, labels, self.rampup_weight(epoch), self.options.temperature,
                                   self.options.logit_std)
        if self.options.peer_kl > 0:
            terms["loss_kl_peer"] = self.options.peer_kl * mutual_kl(logits, 1.0, self.options.logit_std)
        return terms
