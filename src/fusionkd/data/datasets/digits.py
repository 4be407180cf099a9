"""scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..containers import ArrayDataset, SourceSplits
from ..splits import stratified_split
from .base import LoadRequest, register_dataset, resize_images

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 1797  # fixed: the digits test split never changes


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (1797, 8, 8) images scaled from 0..16 to 0..255, int64 labels (parsed
    once per process; callers must not modify them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'fusionkd[digits]')") from e
    d = load_digits()
    x = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x.flags.writeable = False
    y = np.asarray(d.target, dtype=np.int64)
    y.flags.writeable = False
    return x, y


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1,797 images), upsampled to 16x16, fixed "
                  "80/20 split", in_chans=1, image_size=16, num_classes=10)
def _load_digits(req: LoadRequest) -> SourceSplits:
    x, y = digits_arrays()
    images = resize_images(torch.from_numpy(x[:, None].copy()), req.image_size or 16, mode="nearest")
    tr, te = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED, 10)
    labels = torch.from_numpy(y.copy())
    return SourceSplits(train=ArrayDataset(images[tr], labels[tr]), test=ArrayDataset(images[te], labels[te]),
                        classes=[str(i) for i in range(10)])
