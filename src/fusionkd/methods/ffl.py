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

from .base import MethodContext, register_method
from .fused_deploy import FusedDeployment, check_deploy
from .fusion_online import FFL_RECIPE, FusionOnlineMethod, check_fusion_options
from .peers import PeerNetworks, check_peer_count, resolve_peer_names

__all__ = ["FFL", "FFLS", "FFL_RECIPE", "FusionOnlineMethod", "check_fusion_options"]

_check_common = check_fusion_options  # the name this check had before it moved to fusion_online


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
        logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)
        deploy: str = "best_peer"  #: "best_peer" (one sub-network) or "fused" (all of them + the fusion module)

        def validate(self) -> None:
            check_peer_count(self.peers, "peers")
            check_fusion_options(self.temperature, self.rampup_epochs, self.fusion_weight_decay)
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
        logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)

        def validate(self) -> None:
            check_peer_count(self.branches, "branches")
            check_fusion_options(self.temperature, self.rampup_epochs, self.fusion_weight_decay)

    def __init__(self, ctx: MethodContext, options: Options | None = None) -> None:
        super().__init__(ctx, options)
        self.options.validate()
        names = [ctx.model] * self.options.branches
        self.peers = PeerNetworks(ctx, names, shared_trunk=True, batched=self.options.batched_peers)
        self._build_fusion(ctx)
