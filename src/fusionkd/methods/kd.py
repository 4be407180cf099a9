"""``kd``: Hinton's knowledge distillation from a frozen, pre-trained teacher (METHODS.md section 0).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS workshop 2015. The student
matches the teacher's temperature-softened class probabilities as well as the labels:

    L = gamma * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with T = 4, gamma = 0.1, alpha = 0.9: the setting of RepDistiller (Tian et al., ICLR 2020) and mdistiller,
whose CIFAR-100 tables are the usual reference. The teacher is frozen and in eval mode.
Heads: ``net`` (the student). Deploy: the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._offline import OfflineMethod, check_temperature, check_weights
from .base import register_method
from .losses import kl_div


@dataclass
class KDOptions:
    """Options of ``kd``.

    Attributes:
        ce_weight: ``gamma``, weight of the cross-entropy with the labels.
        kd_weight: ``alpha``, weight of the soft-label term ``T^2 * KL``.
        temperature: ``T``, the softening temperature.
        logit_std: apply logit standardization to the KL term (z-score both sides' logits before
            dividing by ``T``; Sun et al., CVPR 2024). ``T^2`` is kept.
    """

    ce_weight: float = 0.1
    kd_weight: float = 0.9
    temperature: float = 4.0
    logit_std: bool = False

    def validate(self) -> None:
        check_weights(ce_weight=self.ce_weight, kd_weight=self.kd_weight)
        check_temperature(self.temperature)


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             options: KDOptions | Any) -> dict[str, torch.Tensor]:
    """The weighted terms of Hinton KD (Hinton et al. 2015).

    ``loss_ce = gamma * CE(z_s, y)``, ``loss_kd = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``
    (batch mean; the teacher side is detached). A term whose weight is 0 is left out.

    Args:
        student_logits, teacher_logits: ``(B, K)``.
        labels: ``(B,)`` class ids.
        options: anything with ``ce_weight``, ``kd_weight`` and ``temperature`` (the options of
            ``kd``, ``fitnet`` and ``at``, whose classifier terms are these two); an optional
            ``logit_std`` standardizes the logits of the KL term.
    """
    terms: dict[str, torch.Tensor] = {}
    if options.ce_weight > 0:
        terms["loss_ce"] = options.ce_weight * F.cross_entropy(student_logits.float(), labels)
    if options.kd_weight > 0:
        terms["loss_kd"] = options.kd_weight * kl_div(student_logits, teacher_logits, options.temperature,
                                                     standardize=getattr(options, "logit_std", False))
    return terms


@register_method("kd", "Hinton KD from a pre-trained teacher: 0.1*CE + 0.9*T^2*KL, T=4")
class KD(OfflineMethod):
    """Hinton KD: the student learns from the labels and the teacher's softened probabilities."""
    recipe_epochs = 240  #: RepDistiller's CIFAR-100 schedule, whose gamma/alpha/T these defaults are

    reads_teacher_maps = False  #: logits only: several teachers (teachers=[...]) can teach it
    Options = KDOptions

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        _, teacher_logits = self.teacher_forward(images)
        return kd_terms(self.net(images), teacher_logits, labels, self.options)
