""":func:`prepare_dataset`: build (or resume, or find) the store of a dataset.

The large datasets in their official layouts (TinyImageNet, CUB-200-2011, ImageNet) and the ``store``
dataset now live in :mod:`fusionkd.data.datasets` (``tinyimagenet``, ``cub200``, ``imagenet``,
``store_dataset``). By default these datasets are read from a store (``storage="store"``): decoded once into
raw uint8 shards at a fixed resolution (``fusionkd prepare``, or automatically by the first ``train``), then
read batch by batch. ``storage="memory"`` decodes them into memory instead (cached as ``.npy``, pad crop only).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from .containers import IMAGENET_MEAN, IMAGENET_STD
from .datasets import DATASETS, PREPARE_PROGRESS, LoadRequest, dataset_options
from .store import Store

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "prepare_dataset"]


def prepare_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, image_size: int | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, verify: bool = False, progress=None,
                    **options: Any) -> Store:
    """Build (or resume, or find) the store of dataset ``name`` and return it opened; ``verify`` re-hashes
    every shard. Takes :func:`load_dataset`'s ``data_dir`` / ``image_size`` / dataset options
    (``store_dir``, ``store_size``, ``crop``, ``workers``); ``progress(done, total)`` is called per shard."""
    entry = DATASETS.entry(name)

    accepted = dataset_options(name)
    if "storage" not in accepted:
        raise ValueError(f"dataset {name!r} has no store; the datasets with one: "
                         + ", ".join(n for n in DATASETS.names() if "storage" in inspect.signature(
                             DATASETS.entry(n).obj).parameters))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option(s) {unknown}; accepted options: {', '.join(accepted)}")
    options["storage"] = "store"
    req = LoadRequest(name=name, data_dir=Path(data_dir).expanduser() if data_dir is not None else None,
                      download=False, image_size=image_size,
                      cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None)
    token = PREPARE_PROGRESS.set(progress)
    try:
        src = entry.obj(req, **options)
    finally:
        PREPARE_PROGRESS.reset(token)
    store = src.train.store
    if verify:
        store.verify(progress)
    return store
