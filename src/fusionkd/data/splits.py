"""Stratified, seeded index selection: validation carve-outs and training subsets.

All draws come from ``numpy.random.default_rng([seed, stream])`` so that the validation split and the
subset use independent streams of the same seed, and depend on nothing else (not on torch's global RNG,
not on the run's other draws).
"""

from __future__ import annotations

import numpy as np

VAL_STREAM = 0x5641_4C  # "VAL"
SUBSET_STREAM = 0x5355_42  # "SUB"


def allocate(counts: np.ndarray, total: int, *, minimum: np.ndarray | int = 0,
             maximum: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` across classes proportionally to ``counts`` (largest-remainder rounding).

    Args:
        counts: int (K,) samples available per class.
        total: how many to take overall; ``sum(result) == total``.
        minimum, maximum: per-class bounds on the result (``maximum`` defaults to ``counts``).

    Returns:
        int64 (K,) how many to take from each class.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lo = np.broadcast_to(np.asarray(minimum, dtype=np.int64), counts.shape).copy()
    hi = counts.copy() if maximum is None else np.asarray(maximum, dtype=np.int64).copy()
    lo = np.minimum(lo, hi)
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(f"cannot take {total} samples with per-class bounds [{lo.sum()}, {hi.sum()}]")
    exact = counts * (total / max(int(counts.sum()), 1))
    take = np.clip(np.floor(exact).astype(np.int64), lo, hi)
    # hand out (or take back) the remainder one by one, largest fractional part first; ties -> lower class
    remainder = exact - take
    while take.sum() < total:
        room = take < hi
        k = int(np.argmax(np.where(room, remainder, -np.inf)))
        take[k] += 1
        remainder[k] -= 1
    while take.sum() > total:
        room = take > lo
        k = int(np.argmin(np.where(room, remainder, np.inf)))
        take[k] -= 1
        remainder[k] += 1
    return take


def _pick(labels: np.ndarray, take: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices: ``take[k]`` random samples of each class ``k``."""
    chosen = []
    for k, n in enumerate(take):
        if n:
            idx = np.flatnonzero(labels == k)
            chosen.append(rng.choice(idx, size=int(n), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, num_classes: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set of ``round(fraction * N)`` samples (at least 1) with the class proportions
    of ``labels``; every class keeps at least one training sample.

    Args:
        labels: int (N,) class ids in ``[0, num_classes)``.
        fraction: in ``(0, 1)``.

    Returns:
        ``(train_idx, val_idx)``: sorted, disjoint int64 index arrays covering ``range(N)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    n_val = max(1, int(round(fraction * len(labels))))
    max_val = np.where(present, counts - 1, 0)
    if n_val > max_val.sum():
        raise ValueError(
            f"val_fraction={fraction} asks for {n_val} of {len(labels)} training images, which would leave "
            "some class without a training image; use a smaller val_fraction"
        )
    take = allocate(counts, n_val, maximum=max_val)
    val_idx = _pick(labels, take, np.random.default_rng([seed, VAL_STREAM]))
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def stratified_subset(labels: np.ndarray, size: int, seed: int, num_classes: int) -> np.ndarray:
    """``size`` samples with the class proportions of ``labels`` and at least one of every class present.

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        ValueError: ``size`` larger than ``len(labels)`` or smaller than the number of classes present.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    n_classes = int((counts > 0).sum())
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"subset must be an int or None, got {size!r}")
    if size > len(labels):
        raise ValueError(
            f"subset={size} is larger than the {len(labels)} training images available (after the "
            "validation split); use subset <= that, or subset=None for all of them"
        )
    if size < n_classes:
        raise ValueError(
            f"subset={size} is smaller than the number of classes ({n_classes}); a stratified subset needs "
            "at least one image per class"
        )
    take = allocate(counts, int(size), minimum=(counts > 0).astype(np.int64))
    return _pick(labels, take, np.random.default_rng([seed, SUBSET_STREAM]))
