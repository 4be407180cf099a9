"""The large datasets in their official layouts (TinyImageNet, CUB-200-2011, ImageNet), the ``store``
dataset (a prepared store on its own), and :func:`prepare_dataset`.

By default these datasets are read from a store (``storage="store"``): decoded once into raw uint8
shards at a fixed resolution (``fusionkd prepare``, or automatically by the first ``train``), then read
batch by batch. ``storage="memory"`` decodes them into memory instead (cached as ``.npy``, pad crop only).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .datasets import (
    DATASETS,
    PREPARE_PROGRESS,
    DatasetNotFoundError,
    LoadRequest,
    SourceSplits,
    StoreOptions,
    StoreSource,
    _candidates,
    _materialise,
    _searched,
    _store_source,
    open_store_source,
    register_dataset,
)
from .formats import DataFormatError
from .layouts import CUB_FOLDER, TINY_FOLDER, find_imagenet_root, read_cub200, read_imagenet, read_tinyimagenet
from .store import Store

logger = logging.getLogger(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "prepare_dataset"]

#: The usual ImageNet statistics (torchvision's), used for ``imagenet``; other datasets compute theirs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _find(req: LoadRequest, test, what: str, fix: str) -> Path:
    searched = _candidates(req)
    for c in searched:
        root = test(c)
        if root is not None:
            return root
    raise DatasetNotFoundError(f"{req.name} not found ({what}). Searched:\n{_searched(searched)}\n{fix}"
                               + (f" Automatic download is not supported for {req.name}." if req.download else ""))


def _official(req: LoadRequest, opts: StoreOptions, default_size: int, locate, what: str, fix: str, reader,
              official_classes: int, mean=None, std=None) -> SourceSplits | StoreSource:
    opts.check(req.name)
    try:
        root = _find(req, locate, what, fix)
    except DatasetNotFoundError:
        stored = open_store_source(req, opts, default_size)
        if stored is not None:
            return stored
        raise
    files = reader(root)
    if len(files.classes) < 2:
        raise DataFormatError(f"{root}: {len(files.classes)} class ({files.classes!r}); a classifier needs at least "
                              "two classes")
    if len(files.classes) != official_classes:
        logger.warning("%s at %s has %d classes (the official set has %d)", req.name, root, len(files.classes),
                       official_classes)
    return _materialise(req, files, opts, default_size, mean=mean, std=std)


def _root_finder(folder: str, marker_file: str, marker_dir: str) -> Callable[[Path], Path | None]:
    """A finder of the dataset root in a candidate folder ``c``: ``c/folder`` or ``c`` itself, whichever
    holds ``marker_file`` and the folder ``marker_dir``."""

    def find(c: Path) -> Path | None:
        for root in (c / folder, c):
            if (root / marker_file).is_file() and (root / marker_dir).is_dir():
                return root
        return None

    return find


_tiny_root = _root_finder(TINY_FOLDER, "wnids.txt", "train")


@register_dataset("tinyimagenet", "TinyImageNet: 100k train / 10k val (as test) 64x64 JPEGs, 200 classes "
                  "(official tiny-imagenet-200/ layout); a prepared store by default", in_chans=3, image_size=64,
                  num_classes=200)
def _load_tinyimagenet(req: LoadRequest, *, storage: str = "store", store_dir: str | None = None,
                       store_size: int | None = None, crop: str = "pad", workers: int | None = None
                       ) -> SourceSplits | StoreSource:
    return _official(req, StoreOptions(storage, store_dir, store_size, crop, workers), 64, _tiny_root,
                     "a tiny-imagenet-200/ folder with wnids.txt, words.txt, train/ and val/", "Download "
                     "http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into one of those folders.",
                     read_tinyimagenet, 200)


_cub_root = _root_finder(CUB_FOLDER, "images.txt", "images")


@register_dataset("cub200", "CUB-200-2011: 5,994 train / 5,794 test bird photos, 200 classes (official "
                  "CUB_200_2011/ layout), random-resized crop to 224 px from a prepared store", in_chans=3,
                  image_size=224, num_classes=200)
def _load_cub200(req: LoadRequest, *, storage: str = "store", store_dir: str | None = None,
                 store_size: int | None = None, crop: str = "random-resized", workers: int | None = None
                 ) -> SourceSplits | StoreSource:
    return _official(req, StoreOptions(storage, store_dir, store_size, crop, workers), 224, _cub_root,
                     "a CUB_200_2011/ folder with images.txt, image_class_labels.txt, train_test_split.txt, "
                     "classes.txt and images/", "Download CUB_200_2011.tgz from "
                     "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it into one of those folders.",
                     read_cub200, 200)


@register_dataset("imagenet", "ImageNet ILSVRC-2012: 1.28M train / 50k val (as test), 1000 classes "
                  "(train/<wnid>/, val/ sorted or flat with labels), random-resized crop to 224 px from a "
                  "prepared store", in_chans=3, image_size=224, num_classes=1000)
def _load_imagenet(req: LoadRequest, *, storage: str = "store", store_dir: str | None = None,
                   store_size: int | None = None, crop: str = "random-resized", workers: int | None = None
                   ) -> SourceSplits | StoreSource:
    return _official(req, StoreOptions(storage, store_dir, store_size, crop, workers), 224, find_imagenet_root,
                     "a folder with train/<wnid>/*.JPEG and val/ (or the Kaggle ILSVRC/Data/CLS-LOC/ inside it)",
                     "Get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (or the "
                     "Kaggle imagenet-object-localization-challenge), extract train into train/<wnid>/ and val into "
                     "val/ (sorted into <wnid>/, or flat with LOC_val_solution.csv or the devkit's ground truth).",
                     read_imagenet, 1000, mean=IMAGENET_MEAN, std=IMAGENET_STD)


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
    return _store_source(store, opts, req.image_size or store.resolution)


def prepare_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, image_size: int | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, verify: bool = False, progress=None,
                    **options: Any) -> Store:
    """Build (or resume, or find) the store of dataset ``name`` and return it opened; ``verify`` re-hashes
    every shard. Takes :func:`load_dataset`'s ``data_dir`` / ``image_size`` / dataset options
    (``store_dir``, ``store_size``, ``crop``, ``workers``); ``progress(done, total)`` is called per shard."""
    entry = DATASETS.entry(name)

    accepted = [p.name for p in inspect.signature(entry.obj).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
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
