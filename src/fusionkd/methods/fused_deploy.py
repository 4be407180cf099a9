"""``options.deploy=fused`` for ``ffl`` and ``mfef``: deploy every sub-network together with the fusion
module, as one network whose output is the ``fused`` head (METHODS.md §1: "the fused model as an option").

The deployed module (:class:`FusedPeers`, zoo name ``fused_peers``) holds the peers (``members.k.*``), MFEF's
per-peer blocks when there are any (``post.k.*``) and the fusion module with its classifier (``fusion.*``).
It is rebuilt from its zoo name + ``model_kwargs`` (the peers' zoo names, MFEF's block settings) + weights,
like any deployed network, so ``fusionkd eval``, ``export`` (torch.export and ONNX), ``predict`` and use as a
teacher work on it unchanged. Only independent peers can be deployed this way (the shared-trunk layouts
``ffl_s`` / ``mfef shared_trunk=true`` deploy their best branch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import create_model
from ..models.registry import MODELS
from .fusion import FusionModule
from .mfef_blocks import MFEFBlock

DEPLOY_CHOICES = ("best_peer", "fused")


class FusedPeers(nn.Module):
    """``m`` networks + (optional) per-network blocks + a fusion module: images -> fused logits."""

    def __init__(self, members: nn.ModuleList, post: nn.ModuleList | None, fusion: FusionModule) -> None:
        super().__init__()
        self.members = members
        self.post = post
        self.fusion = fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [m.forward_stages(x)[-1] for m in self.members]
        if self.post is not None:
            maps = [p(f) for p, f in zip(self.post, maps)]
        return self.fusion(maps)


@MODELS.register("fused_peers", "deploy-only: the sub-networks + fusion module of ffl/mfef (options.deploy=fused)",
                 deploy_only=True)
def fused_peers(num_classes: int = 10, in_chans: int = 3, *, peers: list[str] | None = None,
                mfef: dict[str, Any] | None = None, **kwargs: Any) -> FusedPeers:
    """The deployed network of ``options.deploy=fused``; ``peers``: the sub-networks' zoo names; ``mfef``:
    ``{"scales", "mode", "reduction"}`` of MFEF's blocks (absent for FFL)."""
    if not peers:
        raise ValueError("fused_peers is the deployed network of ffl/mfef with options.deploy=fused, not a "
                         "network to train: it needs peers=[zoo names]")
    members = nn.ModuleList(create_model(n, num_classes=num_classes, in_chans=in_chans, **kwargs) for n in peers)
    channels = [m.stage_info[-1].channels for m in members]
    post = None
    if mfef is not None:
        post = nn.ModuleList(MFEFBlock(c, int(mfef["scales"]), str(mfef["mode"]), int(mfef["reduction"]))
                             for c in channels)
    return FusedPeers(members, post, FusionModule(channels, num_classes)).eval()


def check_deploy(method_name: str, deploy: str, shared_trunk: bool) -> None:
    if deploy not in DEPLOY_CHOICES:
        raise ValueError(f"deploy must be one of {', '.join(DEPLOY_CHOICES)}, got {deploy!r}")
    if deploy == "fused" and shared_trunk:
        raise ValueError(f"{method_name}: deploy=fused needs independent sub-networks; with a shared trunk the "
                         "best branch deploys (deploy=best_peer)")


class FusedDeployment:
    """Mixin for :class:`~fusionkd.methods.fusion_online.FusionOnlineMethod` subclasses with a ``deploy`` option:
    ``fused`` deploys :class:`FusedPeers` (head ``fused``), ``best_peer`` keeps best-peer deployment."""

    def _fused(self) -> bool:
        return getattr(self.options, "deploy", "best_peer") == "fused"

    @property
    def deploy_head(self) -> str:
        return "fused" if self._fused() else super().deploy_head

    @property
    def deploy_model_name(self) -> str:
        return "fused_peers" if self._fused() else super().deploy_model_name

    @property
    def deploy_model_kwargs(self) -> dict[str, Any]:
        if not self._fused():
            return super().deploy_model_kwargs
        # the run's model_kwargs reach every member (fused_peers passes its other keywords on to them)
        out: dict[str, Any] = {**self.ctx.model_kwargs, "peers": list(self.peers.names)}
        if self.post is not None:
            o = self.options
            out["mfef"] = {"scales": o.scales, "mode": o.mode, "reduction": o.reduction}
        return out

    def deploy_model(self) -> nn.Module:
        if not self._fused():
            return super().deploy_model()
        return FusedPeers(self.peers.members, self.post, self.fusion)

    def deploy_costs(self) -> dict[str, Any]:
        """Parameters and multiply-adds per image of the fused deployment and of one sub-network."""
        from torch.utils.flop_counter import FlopCounterMode

        def macs(module: nn.Module) -> int:
            x = torch.zeros(1, self.ctx.in_chans, self.ctx.image_size, self.ctx.image_size,
                            device=next(self.parameters()).device)
            was = module.training
            module.eval()
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                module(x)
            module.train(was)
            return int(fc.get_total_flops() // 2)

        def params(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        fused = FusedPeers(self.peers.members, self.post, self.fusion)
        peer = self.peers.deploy(0)
        return {"fused": {"params": params(fused), "macs": macs(fused)},
                "single_peer": {"model": self.peers.names[0], "params": params(peer), "macs": macs(peer)}}
