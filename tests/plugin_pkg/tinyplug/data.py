"""``stripes``: 16x16 grey images of horizontal (class 0) or vertical (class 1) stripes plus noise."""

import numpy as np
import torch

from fusionkd.data import register_dataset
from fusionkd.data.datasets import ArrayDataset, SourceSplits


def _make(n, rng):
    labels = np.arange(n) % 2
    phase = rng.integers(0, 4, n)
    grid = (np.arange(16)[None, :] + phase[:, None]) % 4 < 2  # (n, 16)
    img = np.where(labels[:, None, None] == 0, grid[:, :, None], grid[:, None, :]) * 160 + 40
    img = img + rng.integers(-30, 31, img.shape)
    return ArrayDataset(torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)[:, None]),
                        torch.from_numpy(labels.astype(np.int64)))


@register_dataset("stripes", "horizontal vs vertical stripes, 1x16x16 (example plug-in)", in_chans=1,
                  image_size=16, num_classes=2)
def load_stripes(req, *, size: int = 64):
    rng = np.random.default_rng(0)
    return SourceSplits(train=_make(size, rng), test=_make(32, rng), classes=["horizontal", "vertical"])
