"""``baseline``: one network trained with cross-entropy only. The reference row of every comparison,
and the way to train a teacher for the offline methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, MethodContext, NetDeployment, register_method


@register_method("baseline", "one network, cross-entropy only (also trains teachers)")
class Baseline(NetDeployment, Method):
    family = "baseline"

    def __init__(self, ctx: MethodContext, options=None) -> None:
        super().__init__(ctx, options)
        self.net = ctx.create()

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return {"loss_ce": F.cross_entropy(self.net(images), labels)}

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"net": self.net(images)}

