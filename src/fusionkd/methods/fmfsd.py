"""``fmfsd``: Feature-map fusion self-distillation (Qin et al., Electronics 2025) -- **our reading of the
paper** (METHODS.md section 5 [design]; the paper's full text and code were not available).

[paper] Shallow branches built according to the depth of the network act as students and the full
network is the teacher; a feature-map fusion module lets the branches interact: a spatial enhancement
module makes an attention mask for each branch's map, the masks are averaged and applied to form
intermediate maps, and the mean of the intermediate maps is the fused map.

[design] On the BYOT layout (:mod:`fusionkd.methods.byot`):

* a :class:`~fusionkd.methods.byot.BottleneckBranch` after each non-final stage ``i`` gives ``G_i`` of the
  deepest map's shape ``(B, D, H_L, W_L)``, with its own GAP -> FC head ``z_i``; ``G_L`` is the map the
  backbone's head pools (``D = num_features``) and ``z_L`` the backbone's logits;
* spatial enhancement per map ``A_i = sigmoid(conv7x7([mean_c G_i; max_c G_i]))`` ``(B, 1, H_L, W_L)``,
  own weights per map, ``G_L`` included (option ``fuse_deepest=false`` leaves it out of the fusion);
* ``A_bar = mean_i A_i``, ``H_i = G_i * A_bar`` (option ``residual``: ``G_i + G_i * A_bar``),
  fused map ``F = mean_i H_i`` -> GAP -> FC -> ``z_f``;
* loss, ``i`` over the branches:

      L = sum_i CE(z_i) + CE(z_L) + CE(z_f) + alpha sum_i KL_3(z_L -> z_i) + gamma sum_i KL_3(z_f -> z_i)
          + lambda sum_i mean((G_i - F.detach())^2),     alpha = gamma = 1, lambda = 1.

Heads: ``branch1 .. branch{L-1}``, ``net`` (the deepest classifier) and ``fused``. Deploy: the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MethodContext, register_method
from .byot import BranchedSelfMethod, deepest_map, gap, head_logits
from .losses import kl_div


class SpatialEnhancement(nn.Module):
    """Spatial attention mask of one map: ``A = sigmoid(conv_kxk([mean_c G; max_c G]))``.

    The spatial half of CBAM (Woo et al., ECCV 2018) as FMFSD's spatial enhancement module [design]:
    ``(B, C, H, W) -> (B, 1, H, W)`` with values in ``(0, 1)``; a 2 -> 1 convolution with bias and "same"
    padding.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([g.mean(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))


class FeatureMapFusion(nn.Module):
    """FMFSD's feature-map fusion module [design]: masks, averaged mask, intermediate maps, fused map.

    For maps ``G_1 .. G_m`` of one shape ``(B, D, H, W)``: ``A_i = SE_i(G_i)``, ``A_bar = mean_i A_i``,
    ``H_i = G_i * A_bar`` (``residual``: ``G_i + G_i * A_bar``) and ``F = mean_i H_i`` ``(B, D, H, W)``.

    Args:
        num_maps: ``m``, one spatial-enhancement module (own weights) per map.
        residual: keep the un-masked map, ``H_i = G_i + G_i * A_bar``.
        kernel_size: of the spatial-enhancement convolutions.
    """

    def __init__(self, num_maps: int, residual: bool = False, kernel_size: int = 7) -> None:
        super().__init__()
        self.enhance = nn.ModuleList(SpatialEnhancement(kernel_size) for _ in range(num_maps))
        self.residual = residual

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``maps``: ``[G_i (B, D, H, W)]`` -> (``F (B, D, H, W)``, ``A_bar (B, 1, H, W)``, ``[A_i]``)."""
        if len(maps) != len(self.enhance):
            raise ValueError(f"the fusion module was built for {len(self.enhance)} maps, got {len(maps)}")
        masks = [se(g) for se, g in zip(self.enhance, maps)]
        mean_mask = torch.stack(masks).mean(dim=0)
        inter = [g + g * mean_mask if self.residual else g * mean_mask for g in maps]
        return torch.stack(inter).mean(dim=0), mean_mask, masks


@dataclass
class FMFSDOptions:
    """Options of ``fmfsd`` (our reading of Qin et al. 2025; METHODS.md section 5)."""

    alpha: float = 1.0  #: weight of the soft labels from the deepest classifier, KL_T(z_L -> z_i)
    gamma: float = 1.0  #: weight of the soft labels from the fused classifier, KL_T(z_f -> z_i)
    feature_weight: float = 1.0  #: lambda of mean((G_i - F.detach())^2); set from loss magnitudes, not tuned
    temperature: float = 3.0  #: softmax temperature of the soft-label terms
    fuse_deepest: bool = True  #: include the deepest map G_L (its mask and H_L) in the fusion
    residual: bool = False  #: H_i = G_i + G_i * A_bar instead of G_i * A_bar
    kernel_size: int = 7  #: of the spatial-enhancement convolutions
    logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)

    def validate(self) -> None:
        if min(self.alpha, self.gamma, self.feature_weight) < 0:
            raise ValueError(
                f"alpha, gamma and feature_weight must not be negative, got {self.alpha}, {self.gamma}, "
                f"{self.feature_weight}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number ('same' padding), got {self.kernel_size}")


@dataclass
class FMFSDOutputs:
    """One forward pass of :class:`FMFSD`.

    Attributes:
        branch_maps: ``[G_i (B, D, H_L, W_L)]``, one per branch, shallow to deep.
        branch_logits: ``[z_i (B, K)]``.
        deep_map: ``G_L (B, D, H_L, W_L)``, the map the backbone's head pools.
        deep_logits: ``z_L (B, K)``, the backbone's logits.
        fused_map: ``F (B, D, H_L, W_L)``.
        fused_logits: ``z_f (B, K)``.
        mean_mask: ``A_bar (B, 1, H_L, W_L)``.
    """

    branch_maps: list[torch.Tensor]
    branch_logits: list[torch.Tensor]
    deep_map: torch.Tensor
    deep_logits: torch.Tensor
    fused_map: torch.Tensor
    fused_logits: torch.Tensor
    mean_mask: torch.Tensor


@register_method("fmfsd", "FMFSD: BYOT-style branches + spatial-attention feature-map fusion (our design reading)")
class FMFSD(BranchedSelfMethod):
    """Feature-map fusion self-distillation (Qin et al. 2025), our reading; see the module docstring."""
    recipe_epochs = None  #: its defaults are our design, checked at 10 epochs (docs/methods/self.md): no recipe

    Options = FMFSDOptions

    def __init__(self, ctx: MethodContext, options: FMFSDOptions | None = None) -> None:
        super().__init__(ctx, options)
        o = self.options
        num_maps = len(self.branches) + (1 if o.fuse_deepest else 0)
        self.fusion = FeatureMapFusion(num_maps, o.residual, o.kernel_size)
        self.fused_fc = nn.Linear(self.net.num_features, ctx.num_classes)

    def forward_all(self, images: torch.Tensor) -> FMFSDOutputs:
        """Backbone stages once, the branches, the fusion module and every head."""
        maps = self.net.forward_stages(images)
        deep = deepest_map(self.net.head, maps[-1])
        size = tuple(deep.shape[-2:])
        branch_maps = [body(m, size) for body, m in zip(self.branches, maps[:-1])]
        to_fuse = branch_maps + [deep] if self.options.fuse_deepest else branch_maps
        fused, mean_mask, _ = self.fusion(to_fuse)
        return FMFSDOutputs(
            branch_maps=branch_maps,
            branch_logits=[fc(gap(g)) for fc, g in zip(self.branch_fcs, branch_maps)],
            deep_map=deep,
            deep_logits=head_logits(self.net.head, gap(deep)),
            fused_map=fused,
            fused_logits=self.fused_fc(gap(fused)),
            mean_mask=mean_mask,
        )

    def losses(self, out: FMFSDOutputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms (METHODS.md section 5 [design]), ``i`` over the branches:

        * ``loss_ce_branches = sum_i CE(z_i)``, ``loss_ce_net = CE(z_L)``, ``loss_ce_fused = CE(z_f)``;
        * ``loss_kd_net = alpha sum_i T^2 KL(softmax(z_L/T) || softmax(z_i/T))`` (``z_L`` detached);
        * ``loss_kd_fused = gamma sum_i T^2 KL(softmax(z_f/T) || softmax(z_i/T))`` (``z_f`` detached);
        * ``loss_feat = lambda sum_i mean((G_i - F.detach())^2)`` (mean over batch, channels and positions).
        """
        o = self.options
        target = out.fused_map.detach().float()
        return {
            "loss_ce_branches": sum(F.cross_entropy(z.float(), labels) for z in out.branch_logits),
            "loss_ce_net": F.cross_entropy(out.deep_logits.float(), labels),
            "loss_ce_fused": F.cross_entropy(out.fused_logits.float(), labels),
            "loss_kd_net": o.alpha * sum(kl_div(z, out.deep_logits, o.temperature, o.logit_std)
                                         for z in out.branch_logits),
            "loss_kd_fused": o.gamma * sum(kl_div(z, out.fused_logits, o.temperature, o.logit_std)
                                           for z in out.branch_logits),
            "loss_feat": o.feature_weight * sum((g.float() - target).pow(2).mean() for g in out.branch_maps),
        }

    def heads(self, out: FMFSDOutputs) -> dict[str, torch.Tensor]:
        return {**super().heads(out), "fused": out.fused_logits}

