"""``at``: activation-based attention transfer from a frozen, pre-trained teacher (METHODS.md section 0).

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017. The student matches the teacher's spatial attention
maps ``phi(F) = normalize(mean_c(F^2).flatten())`` at several stages:

    L = gamma * CE(z_s, y) + beta / 2 * sum_{(i, j)} mean((phi(F_s_i) - phi(F_t_j))^2)  [+ alpha * KL_T]

with beta = 1000 and gamma = 1, exactly the authors' code (``opt.beta / 2 * sum(at_losses)``, the mean
over batch and positions). RepDistiller uses ``beta * sum`` with beta = 1000, i.e. twice this weight: pass
``at_weight=2000`` for parity with its tables.

Pairs: student stage ``i`` with teacher stage ``i`` when both networks have the same number of stages
(every stage output, as the paper's group outputs and RepDistiller's ``feat[1:-1]``); otherwise each
student stage with the deepest teacher stage of the same stride (resolution), stages without a partner
being skipped. Maps of one pair that still differ in size (equal stage counts, different strides) are
compared at the smaller resolution: the channel-mean energy ``mean_c(F^2)`` of the larger one is
average-pooled before normalisation (our extension; the paper only pairs maps of equal size).
``kd_weight > 0`` adds Hinton KD (AT+KD in the paper; off by default). Heads: ``net``. Deploy: the student.

Maps: by default the backbone contract's stage maps (post-activation: on a WRN the BN-ReLU that the next
block applies, see :mod:`fusionkd.models.base`). ``maps=raw`` takes the raw stage outputs instead, which is
what the authors' WRN code attends to (its ``f`` returns the group outputs ``g0, g1, g2``, residual sums
before the next block's BN-ReLU). On post-activation networks (ResNets, VGG) the two are the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import StageInfo
from ._offline import OfflineMethod, check_classifier_trained, check_temperature, check_weights
from .base import MethodContext, register_method
from .kd import kd_terms
from .losses import attention_transfer

MAP_KINDS = ("post", "raw")


@dataclass
class ATOptions:
    """Options of ``at``.

    Attributes:
        at_weight: ``beta``; the loss is ``beta / 2 * sum of the pair losses`` (paper: 1000).
        ce_weight: ``gamma``, weight of the cross-entropy with the labels.
        kd_weight: ``alpha``, weight of an optional Hinton KD term (0 = off).
        temperature: ``T`` of the optional KD term.
        maps: ``post`` (the contract's stage maps) or ``raw`` (the raw stage outputs, as the AT authors'
            WRN code; differs from ``post`` on pre-activation networks only).
    """

    at_weight: float = 1000.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    maps: str = "post"

    def validate(self) -> None:
        if self.maps not in MAP_KINDS:
            raise ValueError(f"maps must be one of {', '.join(MAP_KINDS)}, got {self.maps!r}")
        check_weights(at_weight=self.at_weight, ce_weight=self.ce_weight, kd_weight=self.kd_weight)
        check_classifier_trained(self.ce_weight, self.kd_weight)
        check_temperature(self.temperature)


def attention_pairs(student: list[StageInfo], teacher: list[StageInfo]) -> list[tuple[int, int]]:
    """``(student stage, teacher stage)`` pairs: by index when the stage counts match, else by stride."""
    if len(student) == len(teacher):
        return [(i, i) for i in range(len(student))]
    pairs = []
    for i, s in enumerate(student):
        same = [j for j, t in enumerate(teacher) if t.stride == s.stride]
        if same:
            pairs.append((i, same[-1]))
    if not pairs:
        raise ValueError(
            "attention transfer found no student/teacher stages of the same resolution: student strides "
            f"{[s.stride for s in student]}, teacher strides {[t.stride for t in teacher]}"
        )
    return pairs


def attention_pair_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """``mean((phi(s) - phi(t))^2)`` over batch and positions (Zagoruyko & Komodakis 2017), teacher detached.

    ``phi(F) = normalize(mean_c(F^2).flatten())`` per sample. Maps ``(B, C_s, H_s, W_s)`` and
    ``(B, C_t, H_t, W_t)`` may differ in channels; when they differ in size, each energy map
    ``mean_c(F^2)`` is average-pooled to the smaller ``(H, W)`` before the normalisation.
    """
    if student_map.shape[-2:] == teacher_map.shape[-2:]:
        return attention_transfer(student_map, teacher_map)
    size = (min(student_map.shape[-2], teacher_map.shape[-2]), min(student_map.shape[-1], teacher_map.shape[-1]))

    def phi(f: torch.Tensor) -> torch.Tensor:
        energy = F.adaptive_avg_pool2d(f.float().pow(2).mean(dim=1, keepdim=True), size)
        return F.normalize(energy.flatten(1), dim=1)

    return (phi(student_map) - phi(teacher_map.detach())).pow(2).mean()


@register_method("at", "attention transfer from a pre-trained teacher: CE + 1000/2 * sum of stage AT losses")
class AT(OfflineMethod):
    """Attention transfer: the student's stage attention maps follow the teacher's."""

    Options = ATOptions

    def __init__(self, ctx: MethodContext, options: ATOptions | None = None) -> None:
        super().__init__(ctx, options)
        self.pairs = attention_pairs(self.net.stage_info, self.teacher.stage_info)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        opts = self.options
        raw = opts.maps == "raw"
        t_maps, t_logits = self.teacher_forward(images, raw=raw)
        s_maps, s_logits = self.student_forward(images, raw=raw)
        terms = kd_terms(s_logits, t_logits, labels, opts)
        if opts.at_weight > 0:
            pair_losses = [attention_pair_loss(s_maps[i], t_maps[j]) for i, j in self.pairs]
            terms["loss_at"] = opts.at_weight / 2 * torch.stack(pair_losses).sum()
        return terms

    def summary_extras(self) -> dict:
        return {**super().summary_extras(), "attention_pairs": [list(p) for p in self.pairs]}
