"""Input normalisation of a run: the data's own statistics (default) or ImageNet's (config ``normalize``).

A network pretrained on ImageNet (torchvision, timm) expects its inputs normalised with ImageNet's
per-channel mean and std; fine-tuning it (``weights=``) or distilling from it (``teacher_weights=``) on
data normalised otherwise starts it off-distribution, and a teacher may then look like it is at chance.
``normalize=imagenet`` normalises every split with ImageNet's statistics instead of the training split's;
on grey-scale data it uses their channel means (0.449 / 0.226, timm's convention). The statistics are
stored with the run (checkpoint ``data``), so evaluation, prediction and export use the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..data import DatasetInfo, DataSplits
from ..data.containers import IMAGENET_MEAN, IMAGENET_STD


def imagenet_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std for ``in_chans`` channels (3: per channel; 1: their means; else repeated)."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    m, s = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (round(m, 4),) * in_chans, (round(s, 4),) * in_chans


def apply_normalize(splits: DataSplits, normalize: str | None) -> DataSplits:
    """``splits`` with its ``info.mean``/``info.std`` set as ``normalize`` asks ("data" leaves them)."""
    if normalize in (None, "data"):
        return splits
    if normalize != "imagenet":
        raise ValueError(f"normalize={normalize!r} is not accepted; choose data or imagenet")
    mean, std = imagenet_stats(splits.info.in_chans)
    info: DatasetInfo = dataclasses.replace(splits.info, mean=mean, std=std)
    return dataclasses.replace(splits, info=info)


def normalize_of(cfg: Any) -> str | None:
    """The ``normalize`` setting of a config object or dict (None for configs written before it existed)."""
    return cfg.get("normalize") if isinstance(cfg, dict) else getattr(cfg, "normalize", None)
