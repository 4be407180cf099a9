"""``dkd``: Decoupled Knowledge Distillation from a frozen, pre-trained teacher.

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. The KD loss splits into a
target-class term and a non-target-class term, which DKD weights independently:

    TCKD = T^2 * KL(b_t || b_s),   b = (p_y, 1 - p_y): the binary target / all-non-target split
    NCKD = T^2 * KL(q_t || q_s),   q_k = p_k / (1 - p_y) for k != y: the distribution over non-target classes
    L    = ce_weight * CE(z_s, y) + w(epoch) * (alpha * TCKD + beta * NCKD)

with ``p = softmax(z / T)``, every KL a batch mean and the teacher side detached. ``w`` is the linear
warm-up ``min(e / warmup_epochs, 1)`` of the authors' code (mdistiller, ``mdistiller/distillers/DKD.py``),
where ``e`` counts epochs from 1 (``mdistiller/engine/trainer.py`` starts at ``epoch = 1`` and passes it to
the distiller). fusionkd's ``epoch`` is 0-based, so ``e = epoch + 1``: the first epoch is weighted
``1 / warmup_epochs`` and the ``warmup_epochs``-th (``epoch = warmup_epochs - 1``) and later ones fully, as in
mdistiller. ``warmup_epochs = 0`` means no warm-up (mdistiller would divide by zero).

Defaults: mdistiller's CIFAR-100 setting (``mdistiller/engine/cfg.py``: ``CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0,
T 4.0, WARMUP 20``) and 240-epoch schedule. Soft targets (MixUp / CutMix, ``(B, K)``) are handled by the
linearity used for CE: ``sum_c y_c * DKD(target c)`` over each row's two largest target entries, exact for
fusionkd's mixed targets, which have at most two non-zero entries.
Heads: ``net`` (the student). Deploy: the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._offline import OfflineMethod, check_temperature, check_warmup, check_weights, warmup_factor
from .base import register_method
from .losses import standardize_logits


@dataclass
class DKDOptions:
    """Options of ``dkd``.

    Attributes:
        ce_weight: weight of the cross-entropy with the labels.
        alpha: weight of TCKD, the target-class term.
        beta: weight of NCKD, the non-target-class term.
        temperature: ``T``, the softening temperature of both terms.
        warmup_epochs: length of the linear warm-up of ``alpha * TCKD + beta * NCKD``
            (``min((epoch + 1) / warmup_epochs, 1)``; 0 = none). Not the learning-rate warm-up
            (the config key ``warmup_epochs``).
        logit_std: z-score both sides' logits before TCKD / NCKD (logit standardization, Sun et al.,
            CVPR 2024, as the authors' ``dkd_loss``). ``T^2`` is kept.
    """

    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20
    logit_std: bool = False

    def validate(self) -> None:
        check_weights(ce_weight=self.ce_weight, alpha=self.alpha, beta=self.beta)
        check_temperature(self.temperature)
        check_warmup(self.warmup_epochs)



def _dkd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                    temperature: float, standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled ``(TCKD, NCKD)`` per sample, ``(B,)`` each, for class ids ``target`` ``(B,)``.

    Everything is computed in log space: ``log(1 - p_y)`` as a log-sum-exp over the non-target logits, and
    the non-target distribution as a log-softmax with the target logit excluded, so nothing overflows or
    divides by zero however confident the teacher is.
    """
    t = float(temperature)
    zs = student_logits.float()
    zt = teacher_logits.detach().float()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    zs, zt = zs / t, zt / t
    gt = F.one_hot(target, zs.shape[1]).bool()

    def binary_and_rest(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        all_ = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, target[:, None]) - all_
        log_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1, keepdim=True) - all_
        log_q = F.log_softmax(z.masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)
        return torch.cat([log_target, log_rest], dim=1), log_q

    log_b_s, log_q_s = binary_and_rest(zs)
    log_b_t, log_q_t = binary_and_rest(zt)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="none", log_target=True).sum(1)
    # at the target entry both logs are 0, so exp(0) * (0 - 0) contributes nothing
    nckd = F.kl_div(log_q_s, log_q_t, reduction="none", log_target=True).sum(1)
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float, standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 * KL`` averaged over the batch, teacher detached (Zhao et al. 2022).

    Args:
        student_logits, teacher_logits: ``(B, K)``, ``K >= 2``.
        labels: ``(B,)`` class ids, or ``(B, K)`` soft targets: then ``sum_c y_c * term(c)`` over each row's
            two largest entries (exact for one-hot and MixUp / CutMix targets).
        temperature: ``T > 0``.
        standardize: z-score both sides' logits first (:func:`standardize_logits`).
    """
    k = student_logits.shape[1]
    if k < 2:
        raise ValueError(f"DKD needs at least 2 classes (a target and a non-target class), got {k}")
    t2 = float(temperature) ** 2
    if labels.dim() == 1:
        tckd, nckd = _dkd_per_sample(student_logits, teacher_logits, labels, temperature, standardize)
        return tckd.mean() * t2, nckd.mean() * t2
    weights, classes = labels.float().topk(2, dim=1)
    tckd = nckd = None
    for j in range(2):
        a, b = _dkd_per_sample(student_logits, teacher_logits, classes[:, j], temperature, standardize)
        tckd = weights[:, j] * a if tckd is None else tckd + weights[:, j] * a
        nckd = weights[:, j] * b if nckd is None else nckd + weights[:, j] * b
    return tckd.mean() * t2, nckd.mean() * t2


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              options: DKDOptions, epoch: int) -> dict[str, torch.Tensor]:
    """The weighted terms of DKD at fusionkd's 0-based ``epoch``.

    ``loss_ce = ce_weight * CE``, ``loss_tckd = w * alpha * TCKD``, ``loss_nckd = w * beta * NCKD`` with the
    warm-up factor ``w = warmup_factor(epoch, warmup_epochs)``. A term whose weight is 0 is left out.
    """
    terms: dict[str, torch.Tensor] = {}
    if options.ce_weight > 0:
        terms["loss_ce"] = options.ce_weight * F.cross_entropy(student_logits.float(), labels)
    if options.alpha > 0 or options.beta > 0:
        w = warmup_factor(epoch, options.warmup_epochs)
        tckd, nckd = dkd_loss(student_logits, teacher_logits, labels, options.temperature,
                              getattr(options, "logit_std", False))
        if options.alpha > 0:
            terms["loss_tckd"] = (w * options.alpha) * tckd
        if options.beta > 0:
            terms["loss_nckd"] = (w * options.beta) * nckd
    return terms


@register_method("dkd", "Decoupled KD from a pre-trained teacher: CE + warm-up*(1*TCKD + 8*NCKD), T=4")
class DKD(OfflineMethod):
    """DKD: the student learns from the labels and, separately weighted, the teacher's target-class and
    non-target-class knowledge."""
    recipe_epochs = 240  #: mdistiller's CIFAR-100 schedule, whose weights, T and warm-up these defaults are
    recipe_options = ("ce_weight", "alpha", "beta", "temperature", "warmup_epochs")

    reads_teacher_maps = False  #: logits only: several teachers (teachers=[...]) can teach it
    Options = DKDOptions

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        _, teacher_logits = self.teacher_forward(images)
        return dkd_terms(self.net(images), teacher_logits, labels, self.options, epoch)

