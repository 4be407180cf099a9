"""Data: datasets (:func:`load_dataset`), in memory or in a prepared store on disk, and their batch loaders
(:class:`DeviceLoader`, :class:`StoreLoader`; :func:`make_loader` picks one).

>>> from fusionkd.data import load_dataset, DeviceLoader
>>> splits = load_dataset("fashion-mnist", val_fraction=0.1)
>>> loader = DeviceLoader(splits.train, splits.info, 128, train=True)
>>> images, labels = next(iter(loader))  # float32 (128, 1, 28, 28), int64 (128,)

See ``docs/data.md`` for the datasets, where their files are looked up, caching and the loader.
"""

from .datasets import (
    DATASETS,
    ArrayDataset,
    DatasetInfo,
    DatasetNotFoundError,
    DataSplits,
    channel_stats,
    data_root,
    dataset_options,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .download import DownloadError
from .formats import DataFormatError, read_idx, safe_pickle_load
from .loader import (
    AugmentDraws,
    DeviceLoader,
    EpochPlan,
    augment_batch,
    crop_flip,
    cutout_mask,
    draw_augmentation,
)
from .official import prepare_dataset
from .store import Store, StoreError, StoreMismatchError, StoreSplit, prepare_store
from .store_loader import StoreLoader, make_loader

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "AugmentDraws",
    "DataFormatError",
    "DataSplits",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DeviceLoader",
    "DownloadError",
    "EpochPlan",
    "augment_batch",
    "channel_stats",
    "crop_flip",
    "cutout_mask",
    "data_root",
    "dataset_options",
    "draw_augmentation",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "register_dataset",
    "safe_pickle_load",
    "Store",
    "StoreError",
    "StoreLoader",
    "StoreMismatchError",
    "StoreSplit",
    "make_loader",
    "prepare_dataset",
    "prepare_store",
]
