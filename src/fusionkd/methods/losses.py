"""Loss functions and schedules shared by the methods (METHODS.md section 6).

Every function computes in float32 whatever the autocast precision, so that soft-label losses are not
rounded to bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score of the logits over the classes: ``(z - mean(z)) / (eps + std(z))``, in float32.

    Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024. The conventions
    are those of the authors' ``normalize`` (``mdistiller/distillers/KD.py``): mean and standard deviation
    over the last (class) dimension, the sample (unbiased, ``K - 1``) standard deviation, and ``eps``
    added to the standard deviation (not under the square root). A row with a single class has no
    standard deviation; it is returned centred (all zeros).

    Args:
        logits: ``(..., K)``.
        eps: added to the standard deviation so that a constant row gives zeros, not NaN.
    Returns:
        A float32 tensor of the same shape.
    """
    z = logits.float()
    centred = z - z.mean(dim=-1, keepdim=True)
    if z.shape[-1] < 2:
        return centred
    return centred / (eps + z.std(dim=-1, keepdim=True))


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
           standardize: bool = False) -> torch.Tensor:
    """Hinton's soft-label loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015. The teacher side is
    detached here, so no caller can forget it: the loss trains the student logits only.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; detached inside.
        temperature: ``T > 0``.
        standardize: z-score both sides with :func:`standardize_logits` before dividing by ``T``
            (logit standardization, Sun et al. CVPR 2024); the ``T^2`` factor is kept, as in the
            authors' code.
    Returns:
        A scalar tensor.
    """
    t = float(temperature)
    zs = student_logits.float()
    zt = teacher_logits.detach().float()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    log_p_s = F.log_softmax(zs / t, dim=1)
    log_p_t = F.log_softmax(zt / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Attention map of Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

    ``phi(f) = normalize(mean_c(f^2).flatten())``: ``(B, C, H, W) -> (B, H*W)``, L2-normalised per
    sample. The channel mean makes it indifferent to the channel count.
    """
    a = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((phi(s) - phi(t.detach()))^2)`` over batch and positions; maps must share ``H x W``.

    The teacher map is detached: the loss trains the student side only.
    """
    if student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(
            f"attention transfer needs maps of one spatial size, got {tuple(student.shape[-2:])} "
            f"and {tuple(teacher.shape[-2:])}"
        )
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()


def feature_mse(student_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """``mean((s - t.detach())^2)`` over every element, in float32: a feature map regressing a fixed
    target (FitNets' hint, MFKD's fused teacher map). The target is detached: the loss trains the student
    side only. Shapes must match, ``(B, C, H, W)``.
    """
    return F.mse_loss(student_map.float(), target_map.detach().float())


def sigmoid_rampup(epoch: float, rampup_length: float) -> float:
    """``exp(-5 (1 - min(t, R)/R)^2)`` (Laine & Aila 2017; used by FFL, ONE): 0.0067 at 0, 1 from ``R`` on.

    Args:
        epoch: current epoch ``t`` (0-based; may be fractional).
        rampup_length: ``R``; ``R <= 0`` means no ramp-up (always 1).
    """
    if rampup_length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(epoch: float, warmup_length: float) -> float:
    """DKD-style linear warm-up ``min(t / W, 1)``; ``W <= 0`` means always 1."""
    if warmup_length <= 0:
        return 1.0
    return float(min(max(epoch, 0.0) / warmup_length, 1.0))
