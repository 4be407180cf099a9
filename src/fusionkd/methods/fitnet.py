"""``fitnet``: FitNets hint learning from a frozen, pre-trained teacher (METHODS.md section 0).

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. A *regressor* (here a 1x1 conv + BN
connector) maps a student stage map (the *guided* layer) to the shape of a teacher stage map (the *hint*),
and the student minimises the squared distance to it:

    L = gamma * CE(z_s, y) + beta * mean((conn(F_s) - F_t)^2)  [+ alpha * T^2 * KL(z_t -> z_s)]

Our choices, as in RepDistiller (Tian et al., ICLR 2020), whose CIFAR-100 FitNet rows are the usual
reference: beta = 100, gamma = 1, one joint stage (RepDistiller, too, trains the regressor together with
the student instead of the paper's separate hint-pretraining stage), and the **middle** stage ``n // 2``
of each network as guided/hint layer; ``student_stage`` / ``teacher_stage`` pick others. RepDistiller's
``hint_layer=2`` (mdistiller's ``HINT_LAYER = 2``) takes ``f2`` of both networks' feature lists. That is
the middle stage on the 3-stage CIFAR ResNets and WRNs (``f0`` is the stem, ``f2`` our stage 1) and on
VGG (``f0`` is block 0 = our stage 0, ``f2`` our stage 2), but **not** on the 4-stage MobileNetV2 and
ResNet-18/50, where ``f0`` is the stem, ``f2`` our stage 1 and ``n // 2 = 2``: ``student_stage=1`` (and
``teacher_stage=1`` for a ResNet-18/50 teacher) gives RepDistiller's pair there
(docs/methods/offline.md). When the two maps differ in size, the connector's
output is resized to the teacher map (average pooling down, bilinear up). ``kd_weight > 0`` adds Hinton
KD (off by default, as in RepDistiller's FitNet runs). Heads: ``net``. Deploy: the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._offline import (
    Connector,
    OfflineMethod,
    check_classifier_trained,
    check_temperature,
    check_weights,
    match_size,
    stage_index,
)
from .base import MethodContext, register_method
from .kd import kd_terms
from .losses import feature_mse


@dataclass
class FitNetOptions:
    """Options of ``fitnet``.

    Attributes:
        hint_weight: ``beta``, weight of the hint MSE (RepDistiller: 100).
        ce_weight: ``gamma``, weight of the cross-entropy with the labels.
        kd_weight: ``alpha``, weight of an optional Hinton KD term (0 = off).
        temperature: ``T`` of the optional KD term.
        logit_std: logit standardization of the optional KD term (Sun et al., CVPR 2024).
        student_stage: index of the guided student stage (negative from the end; ``None`` = middle).
        teacher_stage: index of the hint teacher stage (negative from the end; ``None`` = middle).
    """

    hint_weight: float = 100.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    logit_std: bool = False
    student_stage: int | None = None
    teacher_stage: int | None = None

    def validate(self) -> None:
        check_weights(hint_weight=self.hint_weight, ce_weight=self.ce_weight, kd_weight=self.kd_weight)
        check_classifier_trained(self.ce_weight, self.kd_weight)
        check_temperature(self.temperature)


#: FitNets' hint loss / MFKD's feature loss: MSE to the detached target (see ``losses.feature_mse``)
hint_loss = feature_mse


@register_method("fitnet", "FitNets: hint MSE from a teacher stage through a 1x1 conv-BN connector (+CE)")
class FitNet(OfflineMethod):
    """FitNets hints: a connector regresses the teacher's middle-stage map from the student's."""
    recipe_epochs = 240  #: RepDistiller's CIFAR-100 schedule, whose hint weight (beta=100) is the default

    Options = FitNetOptions

    def __init__(self, ctx: MethodContext, options: FitNetOptions | None = None) -> None:
        super().__init__(ctx, options)
        s_info, t_info = self.net.stage_info, self.teacher.stage_info
        self.student_stage = stage_index(self.options.student_stage, len(s_info), "student")
        self.teacher_stage = stage_index(self.options.teacher_stage, len(t_info), "teacher")
        # built only when used: every trainable parameter must take part in the loss (DDP)
        self.connector = (Connector(s_info[self.student_stage].channels, t_info[self.teacher_stage].channels)
                          if self.options.hint_weight > 0 else None)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        opts = self.options
        t_maps, t_logits = self.teacher_forward(images)
        s_maps, s_logits = self.student_forward(images)
        terms = kd_terms(s_logits, t_logits, labels, opts)
        if opts.hint_weight > 0:
            hint = t_maps[self.teacher_stage]
            guided = match_size(self.connector(s_maps[self.student_stage]), hint.shape[-2:])
            terms["loss_hint"] = opts.hint_weight * hint_loss(guided, hint)
        return terms

    def summary_extras(self) -> dict:
        return {**super().summary_extras(), "hint_stages": {"student": self.student_stage,
                                                           "teacher": self.teacher_stage}}
