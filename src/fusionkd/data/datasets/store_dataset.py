"""The ``store`` dataset: a store made by ``fusionkd prepare``, on its own."""

from __future__ import annotations

from pathlib import Path

from ...errors import DatasetNotFoundError
from ..containers import StoreSource
from ..store import Store
from .base import LoadRequest, register_dataset
from .storage import StoreOptions, store_source


@register_dataset("store", "a store made by `fusionkd prepare`, on its own (e.g. copied to another machine): "
                  "store_dir=<folder>", in_chans=3, image_size=None, num_classes=None)
def _load_store(req: LoadRequest, *, store_dir: str | None = None, crop: str = "pad",
                workers: int | None = None) -> StoreSource:
    """The store's own dataset name, classes and statistics are used; ``image_size`` is the served size
    (default: the stored one)."""
    path = store_dir if store_dir is not None else (str(req.data_dir) if req.data_dir is not None else None)
    if path is None:
        raise DatasetNotFoundError("dataset 'store' needs store_dir=<folder of a prepared store> (or data_dir)")
    opts = StoreOptions("store", path, None, crop, workers)
    opts.check("store")
    store = Store(Path(path).expanduser())
    return store_source(store, opts, req.image_size or store.resolution)
