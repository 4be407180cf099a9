"""Reference formulas in plain ``math`` (no torch) for the hand-computed loss tests: one logit row each."""

from __future__ import annotations

import math


def log_softmax(z: list[float], t: float = 1.0) -> list[float]:
    """``log softmax(z / t)``."""
    s = math.log(sum(math.exp(v / t) for v in z))
    return [v / t - s for v in z]


def ce_row(z: list[float], label: int) -> float:
    """Cross-entropy of one logit row with its label."""
    return -log_softmax(z)[label]


def kl_t(teacher: list[float], student: list[float], t: float) -> float:
    """``t^2 * KL(softmax(teacher / t) || softmax(student / t))``: the soft-label term of Hinton KD."""
    lt, ls = log_softmax(teacher, t), log_softmax(student, t)
    return t**2 * sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
