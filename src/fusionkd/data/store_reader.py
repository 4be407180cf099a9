"""Opening a finished store (:class:`Store`) and reading its splits (:class:`StoreSplit`); see
:mod:`fusionkd.data.store` for the format and how a store is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataFormatError, StoreError, StoreMismatchError
from .images import file_kind, open_regular

#: ``progress(done, total)``
ProgressFn = Callable[[int, int], None]

STORE_FORMAT = "fusionkd-store"
STORE_VERSION = 1

__all__ = ["STORE_FORMAT", "STORE_VERSION", "Store", "StoreSplit", "sha256_file"]


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()




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
            got = sha256_file(path)
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
