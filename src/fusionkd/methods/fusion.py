"""FFL's fusion module and mutual-distillation loss, shared by ``ffl``, ``ffl_s`` and ``mfef``.

Kim, Hyun, Kwak, Park, Kwak, "Feature Fusion for Online Mutual Knowledge Distillation", ICPR 2020
(METHODS.md section 1). MFEF (section 3) feeds its processed maps into the same module and trains with
the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import init_weights
from .losses import kl_div

#: FFL's released code ramps the mutual-KD weight up over 80 of its 300 epochs
FFL_RAMPUP_FRACTION = 80.0 / 300.0


class FusionModule(nn.Module):
    """FFL's fusion module **[code]**: m feature maps -> fused logits.

    ``cat_k X_k`` ``(B, sum_k C_k, H, W)`` -> depthwise 3x3 conv (groups = sum C_k, no bias) -> BN -> ReLU
    -> 1x1 conv to ``c_out`` (no bias) -> BN -> ReLU -> global average pool -> FC -> ``z_f`` ``(B, K)``.

    Args:
        in_channels: channels ``C_k`` of each input map, in the order they are passed.
        num_classes: ``K``.
        out_channels: ``c_out``; defaults to ``max(in_channels)`` (the ``c`` of one sub-network when they
            share an architecture, as in the released code).

    The maps must share ``H x W`` (any size: the pooling is adaptive, so 7x7 Fashion-MNIST maps work).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, out_channels: int | None = None) -> None:
        super().__init__()
        if len(in_channels) < 2 or min(in_channels) < 1:
            raise ValueError(f"the fusion module needs 2 or more maps with channels >= 1, got {in_channels}")
        self.in_channels = [int(c) for c in in_channels]
        total = sum(self.in_channels)
        self.out_channels = int(out_channels if out_channels is not None else max(self.in_channels))
        self.depthwise = nn.Conv2d(total, total, 3, padding=1, groups=total, bias=False)
        self.bn1 = nn.BatchNorm2d(total)
        self.pointwise = nn.Conv2d(total, self.out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(self.out_channels, num_classes)
        init_weights(self)

    def fused_map(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[(B, C_k, H, W)]`` -> the fused map ``(B, c_out, H, W)`` (before pooling)."""
        if not torch.jit.is_tracing():  # eager checks (the ONNX tracer sees sizes as tensors)
            if [m.shape[1] for m in maps] != self.in_channels:
                got = [m.shape[1] for m in maps]
                raise ValueError(f"fusion module built for maps of {self.in_channels} channels, not {got}")
            sizes = {tuple(m.shape[-2:]) for m in maps}
            if len(sizes) != 1:
                raise ValueError(f"the fusion module concatenates maps of one H x W, got sizes {sorted(sizes)}")
        x = torch.cat(list(maps), dim=1)
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[(B, C_k, H, W)]`` -> fused logits ``(B, K)``."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.fused_map(maps), 1), 1)
        return self.fc(pooled)


def ffl_rampup_epochs(epochs: int, rampup_epochs: float | None) -> float:
    """``R`` of the sigmoid ramp-up: ``rampup_epochs`` when given, else ``round(80/300 * epochs)``."""
    if rampup_epochs is not None:
        return float(rampup_epochs)
    return float(round(FFL_RAMPUP_FRACTION * epochs))


def fusion_mutual_loss(
    sub_logits: Sequence[torch.Tensor],
    fused_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    temperature: float = 3.0,
    standardize: bool = False,
) -> dict[str, torch.Tensor]:
    """FFL's loss **[code]** as named terms (Kim et al., ICPR 2020, METHODS.md section 1).

    With ``z_e = mean_k z_k`` (the mean of the sub-networks' **logits**) and ramp-up weight ``w = w(t)``::

        L = sum_k CE(z_k) + CE(z_f) + w * [ sum_k KL_T(z_f -> z_k) + KL_T(z_e -> z_f) ]

    ``KL_T(t -> s) = T^2 KL(softmax(t/T) || softmax(s/T))`` with the target ``t`` detached (inside
    :func:`kl_div`): the fused classifier teaches each sub-network, and the logit ensemble teaches the
    fused classifier. Nothing else is detached, so ``CE(z_f)`` and ``KL_T(z_e -> z_f)`` also reach the
    sub-networks through the maps that enter the fusion module.

    Args:
        sub_logits: ``m`` tensors ``(B, K)``.
        fused_logits: ``(B, K)``.
        labels: ``(B,)`` class indices.
        weight: ``w(t)``.
        temperature: ``T``.
        standardize: logit standardization of the KL terms (:func:`~.losses.standardize_logits`).
    Returns:
        ``{"loss_ce": sum_k CE(z_k), "loss_ce_fused": CE(z_f), "loss_kd_sub": w sum_k KL_T(z_f -> z_k),
        "loss_kd_fused": w KL_T(z_e -> z_f)}``, each a float32 scalar.
    """
    ensemble = torch.stack([z.float() for z in sub_logits]).mean(dim=0)
    return {
        "loss_ce": sum(F.cross_entropy(z.float(), labels) for z in sub_logits),
        "loss_ce_fused": F.cross_entropy(fused_logits.float(), labels),
        "loss_kd_sub": weight * sum(kl_div(z, fused_logits, temperature, standardize)
                                    for z in sub_logits),
        "loss_kd_fused": weight * kl_div(fused_logits, ensemble, temperature, standardize),
    }
