"""``dist``: DIST, distillation by the correlation of predictions, from a frozen, pre-trained teacher.

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022. Instead of
matching the teacher's probabilities exactly (KL), the student matches their *relations*, measured by the
Pearson correlation, which ignores shifts and scales of the predictions. With ``p = softmax(z / T)`` as
``(B, K)`` matrices:

    inter = T^2 * (1 - mean_i rho(p_s[i, :], p_t[i, :]))     (each sample's ranking of the classes)
    intra = T^2 * (1 - mean_j rho(p_s[:, j], p_t[:, j]))     (each class's ranking of the batch)
    L     = ce_weight * CE(z_s, y) + beta * inter + gamma * intra

``rho(a, b) = <a - mean(a), b - mean(b)> / (|a - mean(a)| * |b - mean(b)| + 1e-8)``, the authors' Pearson
(a cosine similarity of the mean-centred vectors, the 1e-8 added to the product of the norms).

The defaults are the authors' CIFAR-100 setting (image_classification_sota, ``dist_cifar.yaml``:
``kd: dist_t4``, ``ori_loss_weight: 1``, ``kd_loss_weight: 2`` on ``DIST(beta=1, gamma=1, tau=4)``):
ce_weight = 1, beta = gamma = 2, T = 4, 240 epochs. Their ImageNet setting is the same with T = 1.
Heads: ``net`` (the student). Deploy: the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._offline import OfflineMethod, check_finite, check_temperature, check_weights
from .base import register_method

#: the epsilon the authors' ``cosine_similarity`` adds to the product of the two norms
PEARSON_EPS = 1e-8


@dataclass
class DISTOptions:
    """Options of ``dist``.

    Attributes:
        ce_weight: weight of the cross-entropy with the labels.
        beta: weight of the inter-class relation term (per-sample correlation over classes).
        gamma: weight of the intra-class relation term (per-class correlation over the batch).
        temperature: ``T``, the softening temperature (both terms are multiplied by ``T^2``).
    """

    ce_weight: float = 1.0
    beta: float = 2.0
    gamma: float = 2.0
    temperature: float = 4.0

    def validate(self) -> None:
        check_finite(self, "ce_weight", "beta", "gamma", "temperature")
        check_weights(ce_weight=self.ce_weight, beta=self.beta, gamma=self.gamma)
        check_temperature(self.temperature)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, ``(N, M) -> (N,)``.

    ``<a_c, b_c> / (|a_c| |b_c| + eps)`` with ``x_c = x - mean(x)``: the authors' form, whose ``eps`` keeps a
    constant row (correlation 0) finite.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's two unweighted relation losses ``(inter, intra)``, each ``T^2 * (1 - mean Pearson)``.

    Computed in float32; the teacher side is detached here, so the loss trains the student logits only.

    Args:
        student_logits, teacher_logits: ``(B, K)``.
        temperature: ``T > 0``.
    Returns:
        Two scalar tensors: the inter-class relation (rows, one per sample) and the intra-class relation
        (columns, one per class, over the batch).
    """
    t = float(temperature)
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / t, dim=1)
    inter = (1.0 - pearson_rows(p_s, p_t).mean()) * (t * t)
    intra = (1.0 - pearson_rows(p_s.t(), p_t.t()).mean()) * (t * t)
    return inter, intra


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               options: DISTOptions | Any) -> dict[str, torch.Tensor]:
    """The weighted terms of DIST: ``loss_ce = ce_weight * CE``, ``loss_inter = beta * inter``,
    ``loss_intra = gamma * intra`` (see :func:`dist_relations`). A term whose weight is 0 is left out."""
    terms: dict[str, torch.Tensor] = {}
    if options.ce_weight > 0:
        terms["loss_ce"] = options.ce_weight * F.cross_entropy(student_logits.float(), labels)
    if options.beta > 0 or options.gamma > 0:
        inter, intra = dist_relations(student_logits, teacher_logits, options.temperature)
        if options.beta > 0:
            terms["loss_inter"] = options.beta * inter
        if options.gamma > 0:
            terms["loss_intra"] = options.gamma * intra
    return terms


@register_method("dist", "DIST from a pre-trained teacher: CE + 2*inter + 2*intra Pearson relations, T=4")
class DIST(OfflineMethod):
    """DIST: the student matches the correlations of the teacher's softened predictions, per sample and per
    class."""
    recipe_epochs = 240  #: the authors' CIFAR-100 schedule (dist_cifar.yaml), whose weights these defaults are

    reads_teacher_maps = False  #: logits only: several teachers (teachers=[...]) can teach it
    Options = DISTOptions

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        _, teacher_logits = self.teacher_forward(images)
        return dist_terms(self.net(images), teacher_logits, labels, self.options)
