"""Deterministic class-patterned random images for tests and smoke runs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..containers import SourceSplits
from .base import LoadRequest, as_dataset, register_dataset

SYNTHETIC_SEED = 20250101


def make_synthetic(n: int, prototypes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images: the class prototype plus uniform pixel noise in ``[-64, 64]`` (std 37 grey levels),
    balanced labels in random order.

    Args:
        prototypes: int16 ``(K, C, S, S)`` class patterns in grey levels.

    Returns:
        ``(images uint8 (n, C, S, S), labels int64 (n,))``.
    """
    labels = rng.permutation(np.arange(n) % len(prototypes)).astype(np.int64)
    images = rng.integers(-64, 65, (n, *prototypes.shape[1:]), dtype=np.int16)
    images += prototypes[labels]
    return np.clip(images, 0, 255).astype(np.uint8), labels


@register_dataset("synthetic", "deterministic class-patterned random images for tests and smoke runs "
                  "(default 10 classes, 3x32x32, 500/200)", in_chans=3, image_size=32, num_classes=10)
def _load_synthetic(req: LoadRequest, *, num_classes: int = 10, in_chans: int = 3, train_size: int = 500,
                    test_size: int = 200) -> SourceSplits:
    """Each class has a smooth random pattern (a 4x4 grid of random grey levels per channel, bilinearly
    upsampled, so it stays recognisable after crops and flips); images add pixel noise to it. Everything
    depends only on the options and ``image_size``, never on ``seed``."""
    for key, value, lo in (("num_classes", num_classes, 2), ("in_chans", in_chans, 1),
                           ("train_size", train_size, 1), ("test_size", test_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"synthetic {key} must be an int >= {lo}, got {value!r}")
    if train_size < num_classes:
        raise ValueError(f"synthetic train_size ({train_size}) must be >= num_classes ({num_classes})")
    size = req.image_size or 32
    rng = np.random.default_rng(SYNTHETIC_SEED)
    grid = torch.from_numpy(rng.random((num_classes, in_chans, 4, 4), dtype=np.float32))
    smooth = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    prototypes = (smooth * 175.0 + 40.0).round().to(torch.int16).numpy()
    x_tr, y_tr = make_synthetic(train_size, prototypes, rng)
    x_te, y_te = make_synthetic(test_size, prototypes, rng)
    return SourceSplits(train=as_dataset(x_tr, y_tr), test=as_dataset(x_te, y_te),
                        classes=[f"class_{i}" for i in range(num_classes)])
