"""Readers for the on-disk formats the datasets ship in, and the decoded-image cache.

* IDX (MNIST / Fashion-MNIST), optionally gzip-compressed: :func:`read_idx`.
* CIFAR "python version" pickled batches, read with a restricted unpickler: :func:`load_cifar_pickle`.
* The ``.npy`` cache of decoded image folders, keyed by a fingerprint of the files: :class:`ArrayCache`.

Folders of PNG/JPEG files (:func:`scan_image_tree`, :func:`decode_images`) and the checks every image file
goes through before it is opened (:func:`regular_file_stat`, :func:`open_image`, :func:`max_image_pixels`)
live in :mod:`fusionkd.data.images`; they are importable from here too.

Everything returns numpy arrays; :mod:`fusionkd.data.datasets` turns them into tensors.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import pickle
import shutil
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError
from .images import (  # noqa: F401  (re-exported: their old home)
    IMAGE_EXTENSIONS,
    MAX_PIXELS_ENV,
    ImageFile,
    decode_image,
    decode_images,
    file_kind,
    fingerprint,
    list_classes,
    list_folder,
    max_image_pixels,
    open_image,
    open_regular,
    regular_file_stat,
    scan_image_tree,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- IDX

#: IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    """Whole file contents, transparently gunzipped when the file starts with the gzip magic."""
    try:
        raw = path.read_bytes()
        # one-shot decompression: 3x faster than streaming through gzip.GzipFile
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (EOFError, OSError, zlib.error) as e:
        raise DataFormatError(
            f"{path}: cannot decompress ({e}); the file is corrupt or truncated, delete it and fetch it again"
        ) from e


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a native-endian numpy array.

    The header is ``0x00 0x00 <type code> <ndim>`` followed by ``ndim`` big-endian uint32 sizes; the
    payload must hold exactly ``prod(sizes)`` items of the coded type.

    Returns:
        Array of shape ``sizes`` (e.g. ``(60000, 28, 28)`` uint8 for images, ``(60000,)`` for labels).

    Raises:
        DataFormatError: bad magic, unknown type code, or a payload whose size does not match the header;
            the message names the file.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(
            f"{path}: not an IDX file (first bytes {raw[:4].hex() or 'missing'}, expected 0000<type><ndim>)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        accepted = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise DataFormatError(f"{path}: unknown IDX type code 0x{code:02x} (accepted: {accepted})")
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a huge header cannot overflow
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise DataFormatError(
            f"{path}: IDX payload {kind}: header says {dims} x {dtype.itemsize} bytes = {expected} bytes, "
            f"file holds {got}; the file is corrupt, fetch it again"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read matching IDX image (N, H, W) and label (N,) files and check they agree.

    Returns:
        ``(images uint8 (N, H, W), labels int64 (N,))``.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataFormatError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "the two files do not belong together"
        )
    return images, labels.astype(np.int64)


# ------------------------------------------------------------------------------------- safe pickles


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to latin-1: how Python 3 writes ``bytes`` in protocol-2 pickles."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


def _numpy_scalar() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild plain containers and numpy arrays.

    ``pickle.load`` on a file someone handed you runs arbitrary code: a pickle can name any importable
    callable (``os.system``, ``subprocess.Popen``...) and have it called while loading. Dataset files are
    exactly such files, so every global a pickle references is checked against a short allow-list
    (numpy's array, dtype and scalar reconstruction helpers, latin-1 ``_codecs.encode``, which is how
    protocol-2 pickles written by Python 3 store bytes); anything else raises
    :class:`pickle.UnpicklingError` before it is imported. Dicts, lists, tuples, strings, bytes and
    numbers need no globals and load normally.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        allowed = RestrictedUnpickler._ALLOWED
        if allowed is None:
            allowed = RestrictedUnpickler._ALLOWED = _build_allowed()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays and builtin containers are "
                "allowed in dataset pickles"
            ) from None


def _build_allowed() -> dict[tuple[str, str], Any]:
    # numpy's own reconstruction helpers, wherever this numpy version keeps them
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # multiarray._reconstruct (protocols 0-4)
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]  # numeric._frombuffer (protocol 5)
    scalar = _numpy_scalar()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 2 renamed numpy.core; pickles name their writer's
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


def safe_pickle_load(path: str | os.PathLike[str]) -> Any:
    """Load a pickle with :class:`RestrictedUnpickler` (``encoding="bytes"``, as CIFAR's Python-2 pickles
    need: their dict keys come back as ``bytes``).

    Raises:
        DataFormatError: the file is not a pickle, is truncated, or references a forbidden global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataFormatError(f"{path}: unsafe or invalid pickle: {e}") from e
    except (EOFError, ValueError, TypeError, IndexError, struct.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from e


def _key(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataFormatError(f"{path}: missing key {key!r} (found keys: {sorted(map(str, d))})")


def load_cifar_pickle(path: str | os.PathLike[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch (``data_batch_1``, ``test_batch``, CIFAR-100 ``train``/``test``).

    The batch is a dict with ``b"data"``: uint8 ``(N, 3072)`` rows of 1024 red, 1024 green, 1024 blue
    values (row-major 32x32), and ``label_key`` (``"labels"`` or ``"fine_labels"``): N ints.

    Returns:
        ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.
    """
    path = Path(path)
    batch = safe_pickle_load(path)
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: expected a dict batch, got {type(batch).__name__}")
    data = np.asarray(_key(batch, "data", path))
    labels = np.asarray(_key(batch, label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(
            f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def load_cifar_names(path: str | os.PathLike[str], key: str) -> list[str]:
    """Class names from CIFAR-10 ``batches.meta`` (``key="label_names"``) or CIFAR-100 ``meta``
    (``key="fine_label_names"``)."""
    path = Path(path)
    meta = safe_pickle_load(path)
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(meta).__name__}")
    names = _key(meta, key, path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]




# ------------------------------------------------------------------------------------- array cache


def writable_dir(path: Path) -> bool:
    """Whether ``path`` exists (created if need be) and a file can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False




class ArrayCache:
    """Decoded splits stored as uint8/int64 ``.npy`` files in ``<location>/<prefix><key>/``.

    Args:
        prefix: identifies the dataset folder (dataset name + hash of its absolute path); older entries
            with the same prefix and another key are stale and removed when a new one is written.
        key: the fingerprint of the files and options the arrays were decoded from.
        locations: folders to use, in order of preference; reading looks in all of them, writing uses the
            first writable one.
    """

    VERSION = "1"

    def __init__(self, prefix: str, key: str, locations: Sequence[Path]) -> None:
        self.prefix = prefix
        self.key = key[:24]
        self.locations = [Path(p) for p in locations]

    @property
    def entry_name(self) -> str:
        return f"{self.prefix}{self.key}"

    def find(self) -> Path | None:
        """The folder of a complete cache entry for this key, or None."""
        for loc in self.locations:
            d = loc / self.entry_name
            if (d / "meta.json").is_file():
                return d
        return None

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """``(arrays, meta)`` from a cache hit, or None on a miss or an unreadable entry."""
        d = self.find()
        if d is None:
            return None
        try:
            meta = json.loads((d / "meta.json").read_text())
            if meta.get("version") != self.VERSION:
                return None
            arrays = {name: np.load(d / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]}
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable cache %s (%s)", d, e)
            return None
        logger.info("loaded decoded images from cache %s", d)
        return arrays, meta

    def save(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path | None:
        """Write the entry atomically into the first writable location; returns its folder (None when no
        location is writable, which only costs decoding again next time)."""
        for loc in self.locations:
            if not writable_dir(loc):
                logger.info("cache location %s is not writable, trying the next one", loc)
                continue
            final = loc / self.entry_name
            tmp = Path(tempfile.mkdtemp(dir=loc, prefix=f".tmp-{self.entry_name}-"))
            try:
                for name, arr in arrays.items():
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
                full = {**meta, "version": self.VERSION, "arrays": sorted(arrays)}
                (tmp / "meta.json").write_text(json.dumps(full, indent=1))
                if final.exists():  # another process won the race; keep theirs
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    os.replace(tmp, final)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                logger.warning("could not write cache in %s (%s)", loc, e)
                continue
            for stale in loc.glob(f"{self.prefix}*"):
                if stale.name != self.entry_name and stale.is_dir():
                    logger.info("removing stale cache %s", stale)
                    shutil.rmtree(stale, ignore_errors=True)
            logger.info("cached decoded images in %s", final)
            return final
        logger.warning("no writable cache location among %s; images will be decoded again next time",
                       [str(p) for p in self.locations])
        return None
