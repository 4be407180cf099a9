"""Datasets as in-memory uint8 tensors (or splits of a prepared store): the registry, one module per
dataset, and :func:`load_dataset`.

Every dataset is loaded whole into memory as ``uint8 (N, C, H, W)`` images and ``int64 (N,)`` labels
(Fashion-MNIST: 47 MB, CIFAR: 150 MB, CINIC-10: 830 MB), then split into train / validation / test:

* a validation split is carved from the training split, stratified and seeded (``val_fraction``,
  ``seed``), unless the dataset ships its own (CINIC-10 ``valid/``, an image folder's ``val/``), which is
  then used as is;
* ``subset=N`` keeps a stratified, seeded N-image subset of what remains for training.

Files are looked up in ``data_dir`` (or ``data_dir/<name>``) only, when it is given: a folder the user names
is used or refused, never replaced by another copy. Without ``data_dir``: ``$FUSIONKD_DATA/<name>`` (default
``./data/<name>`` when ``FUSIONKD_DATA`` is unset), then dataset-specific system folders. See
``docs/data.md`` for every dataset's format and layout.

Modules: :mod:`.base` (the registry, :func:`load_dataset`, the helpers every loader shares), :mod:`.storage`
(decoded image folders: the ``.npy`` cache, stores), then one module per dataset: :mod:`.fashion_mnist`,
:mod:`.cifar` (cifar10, cifar100), :mod:`.cinic`, :mod:`.imagefolder`, :mod:`.digits`, :mod:`.synthetic`,
and the official layouts :mod:`.tinyimagenet`, :mod:`.cub200`, :mod:`.imagenet` (sharing :mod:`.official`)
and :mod:`.store_dataset` (``store``). Every name is importable from here, as when this package was one module.
"""

# ruff: noqa: F401  (re-exports)
from __future__ import annotations

import sys
import types

from ...errors import DatasetNotFoundError, StoreMismatchError
from .. import download as dl
from ..containers import ArrayDataset, DatasetInfo, DataSplits, SourceSplits, StoreSource
from ..formats import ArrayCache, DataFormatError, load_cifar_names, load_cifar_pickle, read_idx_pair, writable_dir
from ..images import ImageFile, decode_images, fingerprint, list_classes, scan_image_tree
from ..layouts import FileSplits
from ..splits import stratified_split, stratified_subset
from ..store import Store, StoreSplit, prepare_store, store_lock
from . import storage
from .base import (
    DATASETS,
    LoaderFn,
    LoadRequest,
    as_dataset,
    candidate_dirs,
    carve_splits,
    channel_stats,
    data_root,
    dataset_options,
    format_searched,
    list_datasets,
    load_dataset,
    register_dataset,
    resize_images,
)
from .storage import (
    PREPARE_PROGRESS,
    STORAGES,
    StoreOptions,
    cache_locations,
    decode_files,
    decode_tree,
    default_workers,
    materialise,
    open_store_source,
    store_fingerprint,
    store_source,
)

# the datasets, imported in the order they are registered (list_datasets()'s order)
# isort: off
from . import fashion_mnist, cifar, cinic, imagefolder, digits, synthetic
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FASHION_MNIST_SYSTEM_DIR,
)
from .cifar import CIFAR_SPECS, CifarSpec
from .cinic import CINIC10_CLASSES, CINIC10_MEAN, CINIC10_STD
from .digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_arrays
from .synthetic import SYNTHETIC_SEED, make_synthetic
from . import tinyimagenet, cub200, imagenet, store_dataset
# isort: on

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DataSplits",
    "DatasetInfo",
    "DatasetNotFoundError",
    "LoadRequest",
    "SourceSplits",
    "channel_stats",
    "data_root",
    "dataset_options",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]


