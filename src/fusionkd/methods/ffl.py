"""``ffl`` and ``ffl_s``: Feature Fusion Learning (Kim, Hyun, Kwak, Park, Kwak, ICPR 2020), METHODS.md §1.

``m`` sub-networks are trained together with a fusion module that turns their last feature maps into a
fused classifier (:class:`~fusionkd.methods.fusion.FusionModule`). The logit ensemble of the
sub-networks teaches the fused classifier, and the fused classifier teaches each sub-network back::

    z_e = mean_k z_k,   z_f = Fusion(X_1, ..., X_m)
    L = sum_k CE(z_k) + CE(z_f) + w(t) [ sum_k KL_3(z_f -> z_k) + KL_3(z_e -> z_f) ]
    w(t) = exp(-5 (1 - min(t, R)/R)^2),  R = 80/300 of the epochs   [code]

Every KL target is detached; the maps ``X_k`` entering the fusion module are not, so ``CE(z_f)`` and
``KL(z_e -> z_f)`` also train the sub-networks.

Layouts:

* ``ffl`` **[paper]**: independent sub-networks, ``peers`` copies of ``model`` or the (possibly
  heterogeneous) list ``models``, e.g. ``resnet32`` + ``wrn_16_2``; their last maps must share ``H x W``.
* ``ffl_s`` **[code]**: stem + all stages but the last shared; ``branches`` copies of the last stage, each
  with GAP -> FC (the released code: 2 branches on ResNet-32).

Optimisation **[code]**: SGD with Nesterov momentum, weight decay 1e-4 for the networks (the ``recipe``)
and 1e-5 for the fusion module and fused classifier (``fusion_weight_decay``, its own parameter group).

Heads: ``sub1..subm``, ``ensemble`` (mean logits), ``fused``. Deploy: the sub-network with the best
validation accuracy (``best_peer`` buffer), or with ``options.deploy=fused`` (``ffl``, ``mfef``) every
sub-network + the fusion module as one network whose output is the ``fused`` head
(:mod:`fusionkd.methods.fused_deploy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Method, MethodContext, register_method
from .fused_deploy import FusedDeployment, check_deploy
from .fusion import FusionModule, ffl_rampup_epochs, fusion_mutual_loss
from .losses import sigmoid_rampup
from .peers import BestPeerDeployment, PeerNetworks, check_peer_count, resolve_peer_names

FFL_RECIPE: dict[str, Any] = {"nesterov": True, "weight_decay": 1e-4}


def _check_common(temperature: float, rampup_epochs: float | None, fusion_weight_decay: float) -> None:
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
        return fusion_mutual_loss(logits, fused, labels, self.rampup_weight(epoch), self.options.temperature)

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


@register_method("ffl", "Feature Fusion Learning: independent (heterogeneous) sub-networks + fusion module")
class FFL(FusedDeployment, FusionOnlineMethod):
    accepts_models = True

    @dataclass
    class Options:
        """Options of ``ffl``."""

        peers: int | None = None  #: number of sub-networks, 2 to 16 (default 2, or the length of ``models``)
        temperature: float = 3.0  #: T of the KL terms
        rampup_epochs: float | None = None  #: R of the sigmoid ramp-up (default 80/300 of the epochs)
        fusion_weight_decay: float = 1e-5  #: weight decay of the fusion module and fused classifier
        batched_peers: bool = False  #: run same-architecture sub-networks as one vmap-ed computation
        deploy: str = "best_peer"  #: "best_peer" (one sub-network) or "fused" (all of them + the fusion module)

        def validate(self) -> None:
            check_peer_count(self.peers, "peers")
            _check_common(self.temperature, self.rampup_epochs, self.fusion_weight_decay)
            check_deploy("ffl", self.deploy, shared_trunk=False)

    def __init__(self, ctx: MethodContext, options: Options | None = None) -> None:
        super().__init__(ctx, options)
        self.options.validate()
        self.peers = PeerNetworks(ctx, resolve_peer_names(ctx, self.options.peers),
                                  batched=self.options.batched_peers)
        self.peers.require_same_map_size("ffl")
        self._build_fusion(ctx)


@register_method("ffl_s", "Feature Fusion Learning, shared trunk: m last-stage branches + fusion module")
class FFLS(FusionOnlineMethod):

    @dataclass
    class Options:
        """Options of ``ffl_s``."""

        branches: int = 2  #: number of last-stage branches m, 2 to 16 (2 in the released code)
        temperature: float = 3.0  #: T of the KL terms
        rampup_epochs: float | None = None  #: R of the sigmoid ramp-up (default 80/300 of the epochs)
        fusion_weight_decay: float = 1e-5  #: weight decay of the fusion module and fused classifier
        batched_peers: bool = False  #: run the branches as one vmap-ed computation

        def validate(self) -> None:
            check_peer_count(self.branches, "branches")
            _check_common(self.temperature, self.rampup_epochs, self.fusion_weight_decay)

    def __init__(self, ctx: MethodContext, options: Options | None = None) -> None:
        super().__init__(ctx, options)
        self.options.validate()
        names = [ctx.model] * self.options.branches
        self.peers = PeerNetworks(ctx, names, shared_trunk=True, batched=self.options.batched_peers)
        self._build_fusion(ctx)
