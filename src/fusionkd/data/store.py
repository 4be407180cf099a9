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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import StoreError, StoreMismatchError
from .formats import DataFormatError, ImageFile, decode_image, file_kind, open_regular

logger = logging.getLogger(__name__)

STORE_FORMAT = "fusionkd-store"
STORE_VERSION = 1
#: default bytes per shard (the prepare process holds one shard in memory)
SHARD_BYTES = 64 * 2**20

__all__ = [
    "Store",
    "StoreError",
    "StoreMismatchError",
    "StoreSplit",
    "prepare_store",
    "store_lock",
]


ProgressFn = Callable[[int, int], None]


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


def _sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
            "file": f"{split}-labels.npy", "sha256": _sha256_file(root / f"{split}-labels.npy")}
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


# --------------------------------------------------------------------------------------------- open


def _is_int(x: Any, lo: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a manifest that :class:`Store` reads (their types, ranges and
    agreement with each other), or None. File names are checked where they are opened (:meth:`Store._member`)."""
    if not isinstance(m.get("dataset"), str) or not m["dataset"]:
        return f"'dataset' must be a non-empty string, got {m.get('dataset')!r}"
    if not _is_int(m.get("resolution"), 1):
        return f"'resolution' must be an int >= 1, got {m.get('resolution')!r}"
    if not _is_int(m.get("shard_size"), 1):
        return f"'shard_size' must be an int >= 1, got {m.get('shard_size')!r}"
    if not isinstance(m.get("fingerprint"), str):
        return f"'fingerprint' must be a string, got {type(m.get('fingerprint')).__name__}"
    classes = m.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return f"'classes' must be a list of class names (strings), got {type(classes).__name__}"
    if len(classes) < 2:
        return f"'classes' holds {len(classes)} class(es) {classes!r}; a classifier needs at least two"
    for key in ("mean", "std"):
        values = m.get(key)
        if not isinstance(values, list) or len(values) != 3:
            return f"'{key}' must be a list of 3 numbers (one per RGB channel), got {values!r}"
        if not all(_is_number(v) for v in values):
            return (f"'{key}' must be 3 finite numbers, got {values!r} (NaN or infinite statistics would turn every "
                    "normalised pixel into NaN)")
    if any(v <= 0 for v in m["std"]):
        return f"'std' must be positive, got {m['std']!r}"
    shards, labels = m.get("shards"), m.get("labels")
    if not isinstance(shards, dict) or not shards:
        return f"'shards' must be an object mapping each split to its list of shards, got {type(shards).__name__}"
    if not isinstance(labels, dict) or set(labels) != set(shards):
        return (f"'labels' must be an object with one entry per split of 'shards' ({sorted(shards)}), got "
                f"{sorted(labels) if isinstance(labels, dict) else type(labels).__name__}")
    for split, entries in shards.items():
        if not isinstance(entries, list):
            return f"'shards' of split {split!r} must be a list, got {type(entries).__name__}"
        for k, e in enumerate(entries):
            if not (isinstance(e, dict) and isinstance(e.get("file"), str) and _is_int(e.get("count"), 1)
                    and isinstance(e.get("sha256"), str)):
                return (f"shard {k} of split {split!r} must be {{'file': str, 'count': int >= 1, 'sha256': str}}, "
                        f"got {e!r}")
            full = k < len(entries) - 1
            if (full and e["count"] != m["shard_size"]) or e["count"] > m["shard_size"]:
                return (f"shard {k} of split {split!r} holds {e['count']} images, but every shard but the last holds "
                        f"exactly shard_size={m['shard_size']} (and the last at most that)")
        e = labels[split]
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)):
            return f"'labels' of split {split!r} must be {{'file': str, 'sha256': str}}, got {e!r}"
    return None


class Store:
    """A finished store, opened and checked.

    Args:
        root: the store folder.
        dataset, resolution, fingerprint: what the caller expects; None skips that check. A mismatch
            raises :class:`StoreMismatchError` saying what differs.

    Raises:
        StoreError: not a store, an unfinished one, a missing or truncated shard or labels file.
    """

    def __init__(self, root: str | os.PathLike[str], *, dataset: str | None = None, resolution: int | None = None,
                 fingerprint: str | None = None) -> None:
        self.root = Path(root)
        man_path = self.root / "manifest.json"
        if not man_path.is_file():
            if (self.root / "plan.json").is_file():
                raise StoreError(f"{self.root}: unfinished store (its prepare was interrupted); run the same "
                                 "`fusionkd prepare` (or training command) again to resume it")
            raise StoreError(f"{self.root}: not a fusionkd store (no manifest.json); build one with "
                             "`fusionkd prepare`")
        try:
            with open_regular(man_path) as f:
                m = json.loads(f.read())
        except (ValueError, OSError) as e:
            if isinstance(e, DataFormatError):
                raise StoreError(str(e)) from None
            raise StoreError(f"{man_path}: unreadable manifest ({e}); prepare the store again") from e
        if not isinstance(m, dict):
            raise StoreError(f"{man_path}: holds a JSON {type(m).__name__}, not the manifest object of a fusionkd "
                             "store; prepare the store again")
        if m.get("format") != STORE_FORMAT or m.get("version") != STORE_VERSION:
            raise StoreError(f"{man_path}: format {m.get('format')!r} version {m.get('version')!r}, expected "
                             f"{STORE_FORMAT!r} version {STORE_VERSION}")
        problem = _manifest_problem(m)
        if problem:
            raise StoreError(f"{man_path}: {problem}; this is not a manifest that fusionkd writes (damaged or "
                             "edited): copy the store again or prepare it again")
        self.manifest = m
        self.dataset: str = m["dataset"]
        self.resolution: int = int(m["resolution"])
        self.classes: list[str] = list(m["classes"])
        self.mean: tuple[float, ...] = tuple(float(x) for x in m["mean"])
        self.std: tuple[float, ...] = tuple(float(x) for x in m["std"])
        self.shard_size: int = int(m["shard_size"])
        self.image_bytes = 3 * self.resolution * self.resolution
        if dataset is not None and dataset != self.dataset:
            raise StoreMismatchError(f"{self.root}: a store of dataset {self.dataset!r}, this run asks for "
                                     f"{dataset!r}")
        if resolution is not None and resolution != self.resolution:
            raise StoreMismatchError(
                f"{self.root}: holds {self.resolution} px images, this run asks for {resolution} px (store_size); "
                f"pass store_size={self.resolution} or prepare a store at {resolution} px in another store_dir")
        if fingerprint is not None and fingerprint != m["fingerprint"]:
            raise StoreMismatchError(
                f"{self.root}: built from other data than this run's files (fingerprint {m['fingerprint'][:12]}… vs "
                f"{fingerprint[:12]}…: images added, removed or changed, or another dataset folder); prepare "
                "it again (remove the folder) or point store_dir elsewhere")
        self._files: dict[str, list[Path]] = {}
        self._counts: dict[str, int] = {}
        for split, entries in m["shards"].items():
            paths = []
            for e in entries:
                p = self._member(man_path, e["file"], f"shard of split {split!r}")
                if not os.path.lexists(p):
                    raise StoreError(f"{p}: missing shard of split {split!r} ({e['count']} images); the store is "
                                     "incomplete: copy it again or prepare it again")
                self._regular(p)
                size, want = p.stat().st_size, e["count"] * self.image_bytes
                if size != want:
                    raise StoreError(f"{p}: truncated or damaged shard: {size} bytes, the manifest says {want} "
                                     f"({e['count']} images of 3x{self.resolution}x{self.resolution}); copy it "
                                     "again or prepare the store again")
                paths.append(p)
            self._files[split] = paths
            self._counts[split] = sum(e["count"] for e in entries)
        self._labels: dict[str, np.ndarray] = {}
        for split, e in m["labels"].items():
            p = self._member(man_path, e["file"], f"labels file of split {split!r}")
            if not os.path.lexists(p):
                raise StoreError(f"{p}: missing labels file of split {split!r}")
            self._regular(p)
            try:
                lab = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise StoreError(f"{p}: unreadable labels ({err})") from err
            if lab.shape != (self._counts[split],) or lab.dtype != np.int64:
                raise StoreError(f"{p}: {lab.dtype} {lab.shape} labels, expected int64 ({self._counts[split]},)")
            if len(lab) and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise StoreError(f"{p}: labels outside 0..{len(self.classes) - 1}")
            self._labels[split] = lab
        self._fds: dict[tuple[str, int], int] = {}
        self._fd_lock = threading.Lock()

    def _member(self, man_path: Path, name: str, what: str) -> Path:
        """``root/name`` for a file the manifest names, refused unless it stays inside the store folder: a plain
        file name (no absolute path, no folder, no ``..``) whose symbolic links, if any, resolve inside it."""
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise StoreError(f"{man_path}: names {what} {name!r}, which is not a file name inside the store folder "
                             "(a manifest names only files of its own folder: no absolute path, no sub-folder, no "
                             "'..'); the manifest was altered: copy the store again or prepare it again")
        p = self.root / name
        real, home = os.path.realpath(p), os.path.realpath(self.root)
        if os.path.commonpath([real, home]) != home:
            raise StoreError(f"{p}: {what} is a symbolic link to {real}, outside the store folder {home}; a store "
                             "reads only files inside its own folder: copy the real file in, or prepare the store "
                             "again")
        return p

    @staticmethod
    def _regular(p: Path) -> None:
        """Refuse a shard or labels file that is not a regular file (a named pipe would block its reader)."""
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            raise StoreError(f"{p}: cannot be read ({e.strerror or e}); copy the store again or prepare it "
                             "again") from None
        if not stat.S_ISREG(mode):
            raise StoreError(f"{p}: {file_kind(mode)}, not a regular file; a store's shards and labels are regular "
                             "files: copy the store again or prepare it again")

    @property
    def splits(self) -> list[str]:
        return list(self._files)

    def split(self, name: str) -> StoreSplit:
        if name not in self._files:
            raise KeyError(f"{self.root}: no split {name!r} (has {self.splits})")
        return StoreSplit(self, name)

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def verify(self, progress: ProgressFn | None = None) -> None:
        """Re-hash every shard and labels file against the manifest; raises :class:`StoreError` naming the
        first file that differs."""
        entries = [(self.root / e["file"], e["sha256"]) for es in self.manifest["shards"].values() for e in es]
        entries += [(self.root / e["file"], e["sha256"]) for e in self.manifest["labels"].values()]
        for i, (path, want) in enumerate(entries):
            got = _sha256_file(path)
            if got != want:
                raise StoreError(f"{path}: corrupt (SHA-256 {got[:16]}…, the manifest says {want[:16]}…); copy it "
                                 "again or prepare the store again")
            if progress is not None:
                progress(i + 1, len(entries))

    def _fd(self, split: str, shard: int) -> int:
        key = (split, shard)
        fd = self._fds.get(key)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = os.open(self._files[split][shard], os.O_RDONLY)
                    self._fds[key] = fd
        return fd

    def read_into(self, split: str, indices: np.ndarray, out: np.ndarray) -> None:
        """Read images ``indices`` (int (B,)) of ``split`` into ``out`` (uint8 (B, 3, R, R), C-contiguous),
        in increasing file order (kind to disks and the page cache)."""
        nbytes = self.image_bytes
        flat = out.reshape(len(indices), nbytes)
        for pos in np.argsort(indices, kind="stable"):
            i = int(indices[pos])
            shard, within = divmod(i, self.shard_size)
            got = os.preadv(self._fd(split, shard), [flat[pos]], within * nbytes)
            if got != nbytes:
                raise StoreError(f"{self._files[split][shard]}: short read at image {within} ({got} of {nbytes} "
                                 "bytes); the shard was truncated after the store was opened")

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"{s} {n}" for s, n in self._counts.items())
        return f"Store({self.root}, {self.dataset}, {self.resolution} px, {counts})"


@dataclass
class StoreSplit:
    """One split of a :class:`Store` (or a subset of it: ``indices`` into the stored split).

    It stands in for :class:`~fusionkd.data.ArrayDataset` wherever the whole split is not needed in
    memory: ``labels`` (int64 ``(N,)``, in memory), ``len()``, ``select(indices)``, ``class_counts(K)``;
    images are read on demand with :meth:`read`.

    Attributes:
        crop: the training crop the loader applies: ``"pad"`` (CIFAR-style pad + crop at the stored size)
            or ``"random-resized"`` (ImageNet-style random-resized crop to ``output_size``).
        output_size: side of the batches (the network's input); evaluation centre-crops it from the store.
        workers: reader threads of the loader.
    """

    store: Store
    name: str
    indices: np.ndarray | None = None
    crop: str = "pad"
    output_size: int | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        all_labels = self.store.labels(self.name)
        if self.indices is not None:
            self.indices = np.asarray(self.indices, dtype=np.int64)
            self.labels = torch.from_numpy(all_labels[self.indices].copy())
        else:
            self.labels = torch.from_numpy(all_labels.copy())
        if self.output_size is None:
            self.output_size = self.store.resolution
        self.reads = 0  #: images read so far through this object (tests and diagnostics)
        self._reads_lock = threading.Lock()

    @property
    def resolution(self) -> int:
        return self.store.resolution

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.store.resolution, self.store.resolution)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: np.ndarray | torch.Tensor) -> StoreSplit:
        idx = np.asarray(indices, dtype=np.int64)
        base = idx if self.indices is None else self.indices[idx]
        return StoreSplit(self.store, self.name, base, self.crop, self.output_size, self.workers)

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes)

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``(B, 3, R, R)``: the images at positions ``indices`` of this split."""
        idx = np.asarray(indices, dtype=np.int64)
        if out is None:
            out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        self.store.read_into(self.name, idx if self.indices is None else self.indices[idx], out)
        with self._reads_lock:
            self.reads += len(idx)
        return out

    def __repr__(self) -> str:
        return f"StoreSplit({self.store.root.name}/{self.name}, {len(self)} images, {self.resolution} px)"
