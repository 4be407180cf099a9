"""Decoded image folders in memory (through the ``.npy`` cache) or in a prepared store on disk: what
the file-tree datasets (``cinic10``, ``imagefolder``, ``tinyimagenet``, ``cub200``, ``imagenet``) share.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DatasetNotFoundError
from ..containers import CROPS, ArrayDataset, SourceSplits, StoreSource
from ..formats import ArrayCache, writable_dir
from ..images import ImageFile, decode_images, fingerprint, scan_image_tree
from ..layouts import FileSplits
from ..store import Store, StoreMismatchError, StoreSplit, prepare_store, store_lock
from .base import LoadRequest, as_dataset, data_root

logger = logging.getLogger(__name__)


def cache_locations(req: LoadRequest, root: Path) -> list[Path]:
    if req.cache_dir is not None:
        return [req.cache_dir]
    locs = [root / ".fusionkd_cache"]
    if os.environ.get("FUSIONKD_DATA"):
        locs.append(data_root() / ".cache")
    locs.append(Path.home() / ".cache" / "fusionkd")
    return locs


def decode_tree(req: LoadRequest, root: Path, splits: dict[str, Path], classes: list[str],
                 image_size: int, *, all_classes_everywhere: bool) -> tuple[dict[str, ArrayDataset], bool]:
    """Decode ``split -> folder`` trees into RGB uint8 datasets, through the ``.npy`` cache.

    Args:
        all_classes_everywhere: every split must hold every class (CINIC-10); otherwise only ``train`` must.

    Returns:
        ``({split: ArrayDataset (N, 3, S, S)}, all_gray)``.
    """
    files = {split: scan_image_tree(folder, classes, require_all=all_classes_everywhere or split == "train")
             for split, folder in splits.items()}
    return decode_files(req, root, files, classes, image_size)


def decode_files(req: LoadRequest, root: Path, files: dict[str, list[ImageFile]], classes: list[str],
                 image_size: int) -> tuple[dict[str, ArrayDataset], bool]:
    """Decode ``split -> image files`` into RGB uint8 datasets in memory, through the ``.npy`` cache."""
    key = fingerprint([req.name, str(image_size), ",".join(classes)], sorted(files.items()))
    root_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    cache = ArrayCache(f"{req.name}-{root_id}-", key, cache_locations(req, root))
    hit = cache.load()
    if hit is not None:
        arrays, meta = hit
        all_gray = bool(meta["all_gray"])
    else:
        t0 = time.perf_counter()
        n = sum(len(f) for f in files.values())
        logger.info("decoding %d images of %s (once; cached afterwards)", n, root)
        arrays, all_gray = {}, True
        for split, fs in files.items():
            arrays[f"{split}_images"], gray = decode_images(fs, image_size)
            arrays[f"{split}_labels"] = np.array([f.label for f in fs], dtype=np.int64)
            all_gray &= gray
        logger.info("decoded %d images in %.1fs", n, time.perf_counter() - t0)
        cache.save(arrays, {"dataset": req.name, "root": str(root.resolve()), "classes": classes,
                            "image_size": image_size, "all_gray": all_gray,
                            "counts": {s: len(f) for s, f in files.items()}})
    return {s: as_dataset(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in files}, all_gray


STORAGES = ("memory", "store")
#: ``progress(done, total)`` for a store being prepared in this context (set by ``prepare_dataset``)
PREPARE_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("fusionkd_prepare_progress", default=None)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class StoreOptions:
    """The large-data options shared by the file-tree datasets (``tinyimagenet``, ``cub200``, ``imagenet``,
    ``imagefolder``): where images live and how the loader crops them."""

    storage: str
    store_dir: str | None
    store_size: int | None
    crop: str
    workers: int | None

    def check(self, name: str) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"{name} storage must be one of {STORAGES}, got {self.storage!r}")
        if self.crop not in CROPS:
            raise ValueError(f"{name} crop must be one of {CROPS}, got {self.crop!r}")
        if self.crop == "random-resized" and self.storage != "store":
            raise ValueError(f"{name}: crop='random-resized' needs storage='store' (the in-memory loader does the "
                             "CIFAR-style pad crop only)")
        for key, value, lo in (("store_size", self.store_size, 4), ("workers", self.workers, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
                raise ValueError(f"{name} {key} must be an int >= {lo} or None, got {value!r}")

    def resolution(self, output_size: int) -> int:
        """Stored side: ``store_size``, else the output size (pad crop) or 8/7 of it (random-resized crop:
        stored 256 for 224, the usual resize-256 / centre-crop-224 of evaluation)."""
        if self.store_size is not None:
            return self.store_size
        return output_size if self.crop == "pad" else int(round(output_size * 8 / 7))


def _store_path(req: LoadRequest, root: Path, opts: StoreOptions, resolution: int, key: str) -> Path:
    """``store_dir`` when given; else an existing complete store of these files in any cache location, else
    a new one in the first writable location."""
    if opts.store_dir is not None:
        return Path(opts.store_dir).expanduser()
    root_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    name = f"store-{req.name}-{root_id}-{resolution}px-{key[:16]}"
    locations = cache_locations(req, root)
    for loc in locations:
        if (loc / name / "manifest.json").is_file():
            return loc / name
    for loc in locations:
        if writable_dir(loc):
            return loc / name
    raise DatasetNotFoundError(f"no writable place for the store of {req.name} among {[str(p) for p in locations]}; "
                               "pass store_dir=<folder>")


def store_fingerprint(name: str, files: FileSplits, resolution: int) -> str:
    """What a store is built from: dataset name, resolution, classes and every file's name, size and time."""
    return fingerprint([name, str(resolution), ",".join(files.classes)], sorted(files.splits.items()))


def materialise(req: LoadRequest, files: FileSplits, opts: StoreOptions, default_size: int, *,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
                 ) -> SourceSplits | StoreSource:
    """Decode ``files`` into memory (``storage="memory"``, cached) or open / prepare their store."""
    out_size = req.image_size or default_size
    if opts.storage == "memory":
        splits, _ = decode_files(req, files.root, files.splits, files.classes, out_size)
        return SourceSplits(train=splits["train"], test=splits["test"], val=splits.get("val"),
                            classes=files.classes, mean=mean, std=std)
    resolution = opts.resolution(out_size)
    if out_size > resolution:
        raise ValueError(f"{req.name}: image_size={out_size} is larger than the stored {resolution} px "
                         f"(store_size); raise store_size or lower image_size")
    if opts.crop == "pad" and resolution != out_size:
        raise ValueError(f"{req.name}: crop='pad' trains on the stored images at their own size, but store_size="
                         f"{resolution} and image_size={out_size}; make them equal or use crop='random-resized'")
    key = store_fingerprint(req.name, files, resolution)
    path = _store_path(req, files.root, opts, resolution, key)
    with store_lock(path):
        if not (path / "manifest.json").is_file():
            n = sum(len(v) for v in files.splits.values())
            logger.info("preparing the %s store %s: %d images at %d px (once; resumable)", req.name, path, n,
                        resolution)
            prepare_store(path, dataset=req.name, splits=files.splits, classes=files.classes,
                          resolution=resolution, fingerprint=key, mean=mean, std=std,
                          workers=opts.workers or default_workers(), progress=PREPARE_PROGRESS.get())
        store = Store(path, dataset=req.name, resolution=resolution, fingerprint=key)
    return store_source(store, opts, out_size)


def store_source(store: Store, opts: StoreOptions, out_size: int) -> StoreSource:
    kw = dict(crop=opts.crop, output_size=out_size, workers=opts.workers or default_workers())
    split = lambda s: StoreSplit(store, s, **kw) if s in store.splits else None  # noqa: E731
    return StoreSource(train=split("train"), test=split("test"), val=split("val"), classes=store.classes,
                       mean=store.mean, std=store.std)


def open_store_source(req: LoadRequest, opts: StoreOptions, default_size: int) -> StoreSource | None:
    """A finished store at ``store_dir`` used without its source files (e.g. copied to this machine), or
    None when there is none. The dataset name and resolution are still checked."""
    if opts.store_dir is None or opts.storage != "store":
        return None
    path = Path(opts.store_dir).expanduser()
    if not (path / "manifest.json").is_file():
        return None
    out_size = req.image_size or default_size
    resolution = opts.store_size if opts.store_size is not None else None
    store = Store(path, dataset=req.name, resolution=resolution)
    if resolution is None and opts.crop == "pad" and req.image_size is not None and store.resolution != out_size:
        raise StoreMismatchError(f"{path}: holds {store.resolution} px images, this run asks for {out_size} px with "
                                 "the pad crop; pass image_size to match or prepare another store")
    logger.warning("%s: source files not found; using the store %s as it is (its fingerprint is not checked)",
                   req.name, path)
    if req.image_size is None:
        out_size = store.resolution if opts.crop == "pad" else min(out_size, store.resolution)
    return store_source(store, opts, out_size)
