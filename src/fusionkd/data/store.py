"""The large-data path: a folder of raw uint8 image shards, decoded once, read batch by batch.

``prepare_store`` decodes a list of image files once (Pillow, in worker threads: its decoder and resizer
release the GIL) into fixed-resolution RGB ``uint8 (n, 3, R, R)`` shards of a store folder::

    <store>/plan.json             what is being built (written first; a resume must match it)
    <store>/<split>-labels.npy    int64 labels of each split
    <store>/<split>-00000.u8      raw uint8 (n, 3, R, R) images, C order, no header
    <store>/<split>-00000.json    that shard's image count, SHA-256 and per-channel 256-bin histogram
    <store>/manifest.json         written last: the store is complete when it exists

Each shard is written to a temporary file, flushed to disk and renamed before its sidecar is written, so
a ``prepare`` killed at any point (``kill -9`` included) resumes at the first shard without a sidecar, and
the finished store is byte-identical to one built without interruption (everything in it is a function of
the image files and the options; nothing records time or paths of the machine).

:class:`Store` opens a finished store and checks it against what a run asks for (dataset, resolution,
fingerprint of the source files) and against itself (every shard present with the size the manifest
gives; :meth:`Store.verify` re-hashes them). :class:`StoreSplit` is one split (or a subset of it): labels
in memory, images on disk, read with positioned reads (``os.pread``) into a buffer per batch. Reads go
through the page cache, which the kernel can reclaim, so the process's resident memory does not grow with
the store; a memory map would count every touched page of the store in the process's RSS.

This module writes stores; :class:`Store` and :class:`StoreSplit` live in :mod:`fusionkd.data.store_reader`
(importable from here too).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError, StoreMismatchError
from .images import ImageFile, decode_image, open_regular
from .store_reader import STORE_FORMAT, STORE_VERSION, ProgressFn, Store, StoreSplit, sha256_file

logger = logging.getLogger(__name__)

SHARD_BYTES = 64 * 2**20

__all__ = [
    "Store",
    "StoreError",
    "StoreMismatchError",
    "StoreSplit",
    "prepare_store",
    "store_lock",
]



def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_lock(store_dir: Path):
    """Exclusive lock (``flock``) on ``<store_dir>.lock``: one process prepares, the others (e.g. the other
    ranks of a torchrun job) wait and then open the finished store."""
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = store_dir.with_name(store_dir.name + ".lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}"


# ------------------------------------------------------------------------------------------ prepare


def prepare_store(
    store_dir: str | os.PathLike[str],
    *,
    dataset: str,
    splits: dict[str, Sequence[ImageFile]],
    classes: Sequence[str],
    resolution: int,
    fingerprint: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    workers: int = 1,
    shard_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Decode ``splits`` (split name -> image files, in order) into a store at ``store_dir``; resumable.

    Every image is converted to RGB, centre-cropped to its largest square and resized to
    ``resolution`` x ``resolution`` (:func:`fusionkd.data.formats.decode_image`).

    Args:
        fingerprint: identifies the source files and options (recorded; a store is refused by runs whose
            files have another fingerprint).
        mean, std: per-channel statistics to record; None computes them exactly from the ``train`` split's
            stored pixels.
        workers: decoding threads.
        shard_bytes: target size of a shard file (default :data:`SHARD_BYTES`, 64 MiB).
        progress: called as ``progress(images_done, images_total)`` after every shard.

    Returns:
        The store folder.

    Raises:
        StoreMismatchError: ``store_dir`` holds a (finished or unfinished) store of other data / options.
        DataFormatError: an image cannot be decoded (the message names the file).
    """
    root = Path(store_dir)
    per_image = 3 * resolution * resolution
    shard_size = max(1, (shard_bytes or SHARD_BYTES) // per_image)
    plan = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "dataset": dataset, "resolution": resolution,
        "channels": 3, "fingerprint": fingerprint, "classes": list(classes), "shard_size": shard_size,
        "splits": {s: len(fs) for s, fs in splits.items()},
    }
    root.mkdir(parents=True, exist_ok=True)
    plan_path = root / "plan.json"
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None  # a torn plan.json cannot come from _write_json; treat the folder as foreign
        if old != plan:
            what = _plan_difference(old, plan)
            raise StoreMismatchError(
                f"{root}: holds a store (finished or not) of other data or options ({what}); remove the folder "
                "or choose another store_dir"
            )
        if (root / "manifest.json").is_file():
            logger.info("store %s is already complete", root)
            return root
        logger.info("resuming the unfinished store %s", root)
    elif any(root.iterdir()):
        raise StoreMismatchError(f"{root}: not empty and not a fusionkd store; choose an empty or new store_dir")
    else:
        _write_json(plan_path, plan)

    for split, files in splits.items():
        labels = np.array([f.label for f in files], dtype=np.int64)
        lab_path = root / f"{split}-labels.npy"
        tmp = lab_path.with_name(lab_path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, labels, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, lab_path)

    total = sum(len(fs) for fs in splits.values())
    _check_space(root, splits, shard_size, per_image)
    done = 0
    t0 = time.perf_counter()
    decoded = 0
    buf = np.empty((shard_size, 3, resolution, resolution), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fusionkd-decode") as pool:
        for split, files in splits.items():
            for k, start in enumerate(range(0, len(files), shard_size)):
                part = files[start:start + shard_size]
                name = _shard_name(split, k)
                side = root / f"{name}.json"
                data = root / f"{name}.u8"
                if side.is_file() and data.is_file() and data.stat().st_size == len(part) * per_image:
                    done += len(part)
                    continue  # finished before an interruption
                out = buf[: len(part)]

                def work(i: int, part=part, out=out) -> None:
                    out[i] = decode_image(part[i].path, resolution).transpose(2, 0, 1)

                list(pool.map(work, range(len(part))))
                tmp = data.with_name(data.name + ".tmp")
                with open(tmp, "wb") as f:
                    f.write(out.data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, data)
                _fsync_dir(root)
                hist = [np.bincount(out[:, c].ravel(), minlength=256).tolist() for c in range(3)]
                digest = hashlib.sha256(out.data).hexdigest()
                _write_json(side, {"count": len(part), "sha256": digest, "hist": hist})
                done += len(part)
                decoded += len(part)
                rate = decoded / max(time.perf_counter() - t0, 1e-9)
                logger.info("store %s: %d / %d images (%.0f img/s)", root.name, done, total, rate)
                if progress is not None:
                    progress(done, total)

    manifest = dict(plan)
    manifest["shards"] = {}
    hist_train = np.zeros((3, 256), dtype=np.float64)
    for split, files in splits.items():
        entries = []
        for k in range(-(-len(files) // shard_size)):
            name = _shard_name(split, k)
            side = _read_sidecar(root / f"{name}.json", min(shard_size, len(files) - k * shard_size))
            entries.append({"file": f"{name}.u8", "count": side["count"], "sha256": side["sha256"]})
            if split == "train":
                hist_train += np.asarray(side["hist"], dtype=np.float64)
        manifest["shards"][split] = entries
        manifest.setdefault("labels", {})[split] = {
            "file": f"{split}-labels.npy", "sha256": sha256_file(root / f"{split}-labels.npy")}
    if mean is None or std is None:
        values = np.arange(256, dtype=np.float64) / 255.0
        n = hist_train.sum(axis=1, keepdims=True).clip(min=1)
        m = (hist_train * values).sum(axis=1) / n[:, 0]
        v = (hist_train * (values[None] - m[:, None]) ** 2).sum(axis=1) / n[:, 0]
        mean, std = m.tolist(), np.maximum(np.sqrt(v), 1e-3).tolist()
    manifest["mean"] = [round(float(x), 6) for x in mean]
    manifest["std"] = [round(float(x), 6) for x in std]
    _write_json(root / "manifest.json", manifest)
    _fsync_dir(root)
    logger.info("store %s complete: %d images at %d px, %.1f MB", root, total, resolution,
                total * per_image / 1e6)
    return root


def _read_sidecar(path: Path, count: int) -> dict[str, Any]:
    """A shard's sidecar (``count``, ``sha256``, 3x256 ``hist``), checked: the manifest and the store's statistics
    are built from it."""
    try:
        with open_regular(path) as f:
            side = json.loads(f.read())
    except (ValueError, OSError) as e:
        side = e
    ok = isinstance(side, dict) and side.get("count") == count and isinstance(side.get("sha256"), str)
    if ok:
        try:
            hist = np.asarray(side["hist"], dtype=np.float64)
            ok = hist.shape == (3, 256) and bool(np.isfinite(hist).all()) and bool((hist >= 0).all())
        except (KeyError, TypeError, ValueError):
            ok = False
    if not ok:
        raise StoreError(f"{path}: not a shard sidecar of this store (expected {{'count': {count}, 'sha256': str, "
                         "'hist': 3x256 finite counts}); delete it (and its .u8 shard) and run the same prepare "
                         "again to rebuild that shard")
    return side


def _check_space(root: Path, splits: dict[str, Sequence[ImageFile]], shard_size: int, per_image: int) -> None:
    """Refuse to start when the disk cannot hold the shards still to be written (plus one shard of slack for
    the temporary file)."""
    need = 0
    for split, files in splits.items():
        for k, start in enumerate(range(0, len(files), shard_size)):
            n = min(shard_size, len(files) - start)
            data = root / f"{_shard_name(split, k)}.u8"
            if not (data.is_file() and data.stat().st_size == n * per_image):
                need += n * per_image
    free = shutil.disk_usage(root).free
    if need + shard_size * per_image > free:
        raise StoreError(f"{root}: the store needs {_human(need)} more ({per_image:,} bytes per image) but the disk "
                         f"has {_human(free)} free; free space, choose another store_dir, or a smaller store_size "
                         "(bytes grow with its square)")


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.0f} {unit}" if unit in ("bytes", "kB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _plan_difference(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable plan.json"
    for key in ("format", "dataset", "resolution", "fingerprint", "classes", "splits", "shard_size"):
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key == "classes":
                a = f"{len(a)} classes" if isinstance(a, list) else f"a {type(a).__name__} as classes"
                b = f"{len(b)} classes"
            return f"{key}: the folder has {a!r}, this prepare asks for {b!r}"
    return "format details differ"
