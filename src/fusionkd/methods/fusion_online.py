"""What the fusion-based online methods share (``ffl``, ``ffl_s``, ``mfef``; METHODS.md §1 and §3):
:class:`FusionOnlineMethod` (peers + a fusion module + FFL's loss, per-group weight decay, heads, best-peer
deployment), FFL's recipe and the option checks they have in common.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import Method, MethodContext
from .fusion import FusionModule, ffl_rampup_epochs, fusion_mutual_loss
from .losses import sigmoid_rampup
from .peers import BestPeerDeployment, PeerNetworks

FFL_RECIPE: dict[str, Any] = {"nesterov": True, "weight_decay": 1e-4}


def check_fusion_options(temperature: float, rampup_epochs: float | None, fusion_weight_decay: float) -> None:
    """The option checks FFL, FFL-S and MFEF share: ``T > 0``, ``R >= 0`` (or None), fusion weight decay >= 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if rampup_epochs is not None and rampup_epochs < 0:
        raise ValueError(f"rampup_epochs must not be negative (0 disables the ramp-up), got {rampup_epochs}")
    if fusion_weight_decay < 0:
        raise ValueError(f"fusion_weight_decay must not be negative, got {fusion_weight_decay}")


class FusionOnlineMethod(BestPeerDeployment, Method):
    """What FFL, FFL-S and MFEF share: peers, a fusion module over their (processed) last maps, FFL's
    loss, the per-group weight decay, the heads and best-peer deployment.

    Subclasses build ``self.peers`` (a :class:`PeerNetworks`) and call :meth:`_build_fusion`;
    MFEF also sets ``self.post`` (one map-processing module per peer, applied before the fusion).
    """

    family = "online"
    recipe: ClassVar[dict[str, Any]] = FFL_RECIPE
    recipe_epochs = 300  #: the released code's 300 epochs (T=3, ramp-up over 80 of them); ffl_s and mfef too
    head_prefix: ClassVar[str] = "sub"

    peers: PeerNetworks
    fusion: FusionModule

    def _build_fusion(self, ctx: MethodContext, post: nn.ModuleList | None = None) -> None:
        self.post = post
        self.fusion = FusionModule(self.peers.last_channels, ctx.num_classes)
        self.heads = [f"{self.head_prefix}{k + 1}" for k in range(self.peers.num_peers)]
        self.rampup_length = ffl_rampup_epochs(ctx.epochs, self.options.rampup_epochs)
        self.register_buffer("best_peer", torch.zeros((), dtype=torch.long))

    def rampup_weight(self, epoch: int) -> float:
        """``w(t)`` of the mutual-distillation terms at (0-based) ``epoch``."""
        return sigmoid_rampup(epoch, self.rampup_length)

    def _forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (each peer's logits ``(B, K)``, fused logits ``(B, K)``)."""
        out = self.peers(images, self.post)
        return out.logits, self.fusion(out.processed)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int
                      ) -> dict[str, torch.Tensor]:
        logits, fused = self._forward(images)
        return fusion_mutual_loss(logits, fused, labels, self.rampup_weight(epoch), self.options.temperature,
                                  getattr(self.options, "logit_std", False))

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, fused = self._forward(images)
        out = dict(zip(self.heads, logits))
        out["ensemble"] = torch.stack(logits).mean(dim=0)
        out["fused"] = fused
        return out

    def fusion_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with ``fusion_weight_decay``: the fusion module (and MFEF's ``post``)."""
        params = list(self.fusion.parameters())
        if self.post is not None:
            params += list(self.post.parameters())
        return params

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        fusion_ids = {id(p) for p in self.fusion_parameters()}
        networks = [p for p in self.parameters() if p.requires_grad and id(p) not in fusion_ids]
        fusion = [p for p in self.fusion_parameters() if p.requires_grad]
        return [
            {"params": networks, "weight_decay": weight_decay, "name": "networks"},
            {"params": fusion, "weight_decay": self.options.fusion_weight_decay, "name": "fusion"},
        ]

    def summary_extras(self) -> dict[str, Any]:
        out = {"peers": self.peers.names, "deployed_peer": self.deploy_head,
               "rampup_epochs": self.rampup_length}
        if getattr(self.options, "deploy", "best_peer") == "fused":
            out["deploy"] = "fused"
            out["deploy_costs"] = self.deploy_costs()
        return out
