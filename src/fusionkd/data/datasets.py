"""Datasets as in-memory uint8 tensors: the registry, the loaders and :func:`load_dataset`.

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
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetNotFoundError
from ..registry import Registry
from . import download as dl
from .formats import (
    ArrayCache,
    DataFormatError,
    ImageFile,
    _writable_dir,
    decode_images,
    fingerprint,
    list_classes,
    load_cifar_names,
    load_cifar_pickle,
    read_idx_pair,
    scan_image_tree,
)
from .layouts import FileSplits
from .splits import stratified_split, stratified_subset
from .store import Store, StoreMismatchError, StoreSplit, prepare_store, store_lock

logger = logging.getLogger(__name__)

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
    "list_datasets",
    "load_dataset",
    "register_dataset",
]


# ------------------------------------------------------------------------------------ containers


@dataclass
class ArrayDataset:
    """One split held entirely in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, contiguous.
        labels: int64 ``(N,)``, class ids.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "images must be uint8 of shape (N, C, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, indices: np.ndarray | torch.Tensor) -> ArrayDataset:
        """A new dataset holding the samples at ``indices`` (int (M,)), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.images.device.type == "cpu":  # numpy's take: fast and single-threaded
            return ArrayDataset(torch.from_numpy(self.images.numpy()[idx]), torch.from_numpy(self.labels.numpy()[idx]))
        t = torch.as_tensor(idx, device=self.images.device)
        return ArrayDataset(self.images.index_select(0, t), self.labels.index_select(0, t))

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """int64 ``(num_classes,)``: images per class."""
        return torch.bincount(self.labels, minlength=num_classes)


@dataclass
class DatasetInfo:
    """What a model and a checkpoint need to know about the data.

    Attributes:
        name: registry name, e.g. ``"fashion-mnist"``.
        classes: class names, index = label.
        mean, std: per channel, for pixels scaled to ``[0, 1]``.
        in_chans: channels C.
        image_size: H == W of the loaded images (of the batches, for a store).
        stored_size: side the images are stored at when evaluation centre-crops ``image_size`` from them
            (a store served with the random-resized crop, e.g. 256 for 224); None: they are ``image_size``.
    """

    name: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    image_size: int
    stored_size: int | None = None

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per channel), got "
                             f"{len(self.mean)} / {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean/std must be finite numbers, got mean {self.mean}, std {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (lists, not tuples)."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            **({"stored_size": self.stored_size} if self.stored_size is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer checkpoints), missing ones raise."""
        required = ("name", "classes", "mean", "std", "in_chans", "image_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"dataset info is missing {missing} (has {sorted(d)})")
        return cls(
            name=str(d["name"]),
            classes=list(d["classes"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            in_chans=int(d["in_chans"]),
            image_size=int(d["image_size"]),
            stored_size=int(d["stored_size"]) if d.get("stored_size") is not None else None,
        )


@dataclass
class DataSplits:
    """The result of :func:`load_dataset`: in-memory splits, or :class:`~fusionkd.data.StoreSplit` s of a
    prepared store (``storage="store"``)."""

    train: ArrayDataset | StoreSplit
    val: ArrayDataset | StoreSplit | None
    test: ArrayDataset | StoreSplit
    info: DatasetInfo


@dataclass
class StoreSource:
    """What a loader returns when the images stay in a store on disk (see ``SourceSplits``)."""

    train: StoreSplit
    test: StoreSplit
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: StoreSplit | None = None


@dataclass
class SourceSplits:
    """What a dataset loader returns, before validation carve-out and subsetting.

    ``mean``/``std`` None means "compute them from ``train``". ``val`` is a validation split shipped with
    the dataset (used instead of carving one).
    """

    train: ArrayDataset
    test: ArrayDataset
    classes: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    val: ArrayDataset | None = None


@dataclass(frozen=True)
class LoadRequest:
    """The generic arguments of :func:`load_dataset` that a loader may use."""

    name: str
    data_dir: Path | None
    download: bool
    image_size: int | None
    cache_dir: Path | None
    #: False: the caller will not look at the test split; a loader may skip reading its files (fashion-mnist
    #: does) and whatever it returns as test is dropped by :func:`load_dataset`
    with_test: bool = True


LoaderFn = Callable[..., SourceSplits]

#: Registered datasets: ``fn(request: LoadRequest, **options) -> SourceSplits``; extras give the
#: native ``in_chans``/``image_size``/``num_classes`` (None where they depend on the files).
DATASETS: Registry[LoaderFn] = Registry("dataset")


def register_dataset(name: str, description: str, *, in_chans: int | None, image_size: int | None,
                     num_classes: int | None) -> Callable[[LoaderFn], LoaderFn]:
    """Decorator for a loader ``fn(request: LoadRequest, *, <options>) -> SourceSplits``; keyword-only
    parameters of ``fn`` become the dataset's options (``load_dataset(name, **options)``)."""
    return DATASETS.register(name, description, in_chans=in_chans, image_size=image_size,
                             num_classes=num_classes)


def list_datasets() -> list[str]:
    """Registered dataset names, in registration order."""
    return DATASETS.names()


# ------------------------------------------------------------------------------------- helpers


def data_root() -> Path:
    """``$FUSIONKD_DATA`` if set, else ``./data``: the default parent folder of every dataset."""
    env = os.environ.get("FUSIONKD_DATA")
    return Path(env).expanduser() if env else Path("data")


def _candidates(req: LoadRequest, *system: Path) -> list[Path]:
    """Where to look for the files: a ``data_dir`` the user gave is the only place searched (it is used or
    refused, never silently replaced by another copy); otherwise ``$FUSIONKD_DATA/<name>`` and the system
    folders."""
    if req.data_dir is not None:
        return [req.data_dir] if req.data_dir.name == req.name else [req.data_dir, req.data_dir / req.name]
    out: list[Path] = [data_root() / req.name]
    out += list(system)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _searched(paths: Sequence[Path]) -> str:
    return "\n".join(f"  - {p}" for p in paths)


def _tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).to(dtype)


def _dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    return ArrayDataset(_tensor(images, torch.uint8), _tensor(labels, torch.int64))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 ``(N, C, H, W)`` images scaled to [0, 1],
    from a 256-bin histogram per channel (no float copy of the data; numpy's bincount, which unlike
    torch's stays fast with several threads)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    arr = images.numpy()
    means, stds = [], []
    for c in range(arr.shape[1]):
        hist = np.bincount(arr[:, c].ravel(), minlength=256).astype(np.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        v = (hist * (values - m) ** 2).sum() / n
        means.append(float(m))
        stds.append(max(float(np.sqrt(v)), 1e-3))  # a constant image would otherwise divide by zero
    return tuple(means), tuple(stds)


def resize_images(images: torch.Tensor, size: int, *, mode: str = "bilinear", chunk: int = 4096
                  ) -> torch.Tensor:
    """Resize uint8 ``(N, C, H, W)`` to ``(N, C, size, size)`` (bilinear antialiased, or ``"nearest"``)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        x = images[s:s + chunk].float()
        if mode == "nearest":
            y = F.interpolate(x, size=(size, size), mode="nearest")
        else:
            y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[s:s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------ load_dataset


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    val_fraction: float = 0.1,
    subset: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    with_test: bool = True,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` into memory and split it into train / val / test.

    Args:
        name: a registered name (:func:`list_datasets`).
        data_dir: folder holding the dataset's files (or a parent holding ``<name>/``); see the module doc
            for the other places searched.
        download: fetch the official archive when the files are missing (CIFAR only).
        val_fraction: in ``[0, 1)``; the fraction of the training split carved out (stratified) as the
            validation split; 0 -> ``val`` is None. Datasets that ship a validation split use it whenever
            ``val_fraction > 0``.
        subset: keep a stratified N-image subset of the training images left after the validation split.
        seed: seeds the validation carve-out and the subset (the same seed gives the same split; the
            test split never depends on it).
        image_size: side of the returned images. Fixed-size datasets are resized (bilinear, antialiased)
            when it differs from their native size, and their mean/std are then computed from the data;
            image folders, digits and synthetic images are produced at this size directly.
        cache_dir: where decoded image folders are cached (default: next to the data, else
            ``$FUSIONKD_DATA/.cache``, else ``~/.cache/fusionkd``).
        with_test: False returns an empty test split (0 images) and never hands the test images to anyone;
            Fashion-MNIST does not even open its test files then (what ``fusionkd tune`` uses).
        **options: dataset-specific options (e.g. ``synthetic``: ``num_classes``, ``in_chans``,
            ``train_size``, ``test_size``; ``imagefolder``: ``channels``); unknown ones raise.

    Returns:
        :class:`DataSplits` with uint8 images and the :class:`DatasetInfo`.

    Raises:
        fusionkd.registry.UnknownNameError: ``name`` is not registered (the message lists the names).
        DatasetNotFoundError: the files are nowhere to be found (the message lists where it looked).
        ValueError: bad ``val_fraction``, ``subset``, ``image_size`` or option.
    """
    entry = DATASETS.entry(name)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer))
                               or subset <= 0):
        raise ValueError(f"subset must be a positive int or None, got {subset!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 4):
        raise ValueError(f"image_size must be an int >= 4 or None, got {image_size!r}")
    accepted = [p.name for p in inspect.signature(entry.obj).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option(s) {unknown}; accepted options: "
                         f"{', '.join(accepted) if accepted else 'none'}")

    t0 = time.perf_counter()
    req = LoadRequest(
        name=name,
        data_dir=Path(data_dir).expanduser() if data_dir is not None else None,
        download=download,
        image_size=image_size,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
        with_test=with_test,
    )
    src = entry.obj(req, **options)
    if not with_test:  # an empty test split of the same kind (a store split has no images in memory)
        src.test = src.train.select(np.zeros(0, dtype=np.int64)) if isinstance(src, StoreSource) else \
            ArrayDataset(src.train.images[:0].clone(), src.train.labels[:0].clone())
    num_classes = len(src.classes)
    if isinstance(src, StoreSource):
        return _split_store(name, src, val_fraction, subset, seed, t0)

    mean, std = src.mean, src.std
    if image_size is not None and src.train.images.shape[-1] != image_size:
        logger.info("resizing %s from %d to %d pixels", name, src.train.images.shape[-1], image_size)
        resize = lambda d: ArrayDataset(resize_images(d.images, image_size), d.labels)  # noqa: E731
        src.train, src.test = resize(src.train), resize(src.test)
        src.val = resize(src.val) if src.val is not None else None
        mean = std = None
    if mean is None or std is None:
        mean, std = channel_stats(src.train.images)

    if val_fraction > 0 and src.val is not None:
        logger.info("%s ships a validation split: using it (%d images) as val", name, len(src.val))
    train, val = carve_splits(src.train, src.val, val_fraction, subset, seed, num_classes)

    info = DatasetInfo(
        name=name,
        classes=list(src.classes),
        mean=mean,
        std=std,
        in_chans=int(train.images.shape[1]),
        image_size=int(train.images.shape[-1]),
    )
    logger.info("loaded %s in %.2fs: train %d, val %s, test %d images of %dx%dx%d", name,
                time.perf_counter() - t0, len(train), len(val) if val is not None else "none",
                len(src.test), info.in_chans, info.image_size, info.image_size)
    return DataSplits(train=train, val=val, test=src.test, info=info)


def carve_splits(train, shipped_val, val_fraction: float, subset: int | None, seed: int, num_classes: int):
    """``(train, val)``: the dataset's own validation split when it ships one, else a stratified
    ``val_fraction`` of ``train``; then a stratified ``subset`` of what remains for training. Works on any
    split with ``labels`` and ``select`` (in-memory arrays and store index views alike)."""
    val = None
    if val_fraction > 0:
        if shipped_val is not None:
            val = shipped_val
        else:
            tr_idx, val_idx = stratified_split(train.labels.numpy(), val_fraction, seed, num_classes)
            train, val = train.select(tr_idx), train.select(val_idx)
    if subset is not None:
        train = train.select(stratified_subset(train.labels.numpy(), subset, seed, num_classes))
    return train, val


def _split_store(name: str, src: StoreSource, val_fraction: float, subset: int | None, seed: int,
                 t0: float) -> DataSplits:
    """Validation carve-out and subset of a store's splits: index views, no image is read."""
    num_classes = len(src.classes)
    train, val = carve_splits(src.train, src.val, val_fraction, subset, seed, num_classes)
    served = int(train.output_size or train.resolution)
    info = DatasetInfo(name=name, classes=list(src.classes), mean=src.mean, std=src.std, in_chans=3,
                       image_size=served, stored_size=train.resolution if train.resolution != served else None)
    logger.info("opened %s from store %s in %.2fs: train %d, val %s, test %d images, stored at %d px, served at "
                "%d px (%s crop)", name, train.store.root, time.perf_counter() - t0, len(train),
                len(val) if val is not None else "none", len(src.test), train.resolution, info.image_size,
                train.crop)
    return DataSplits(train=train, val=val, test=src.test, info=info)


# ------------------------------------------------------------------------------------ fashion-mnist

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
#: Exact statistics of the 60,000 training images.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_files(folder: Path, with_test: bool = True) -> tuple[dict[str, Path], list[str]]:
    """The four files in ``folder`` (``.gz`` or uncompressed; the two train files only when not
    ``with_test``) and the names of the missing ones."""
    found, missing = {}, []
    for key, stem in FASHION_MNIST_FILES.items():
        if not with_test and key.startswith("test"):
            continue
        for cand in (folder / f"{stem}.gz", folder / stem):
            if cand.is_file():
                found[key] = cand
                break
        else:
            missing.append(f"{stem}.gz")
    return found, missing


@register_dataset("fashion-mnist", "Fashion-MNIST: 60k/10k 28x28 grayscale clothing images, 10 classes "
                  "(IDX files)", in_chans=1, image_size=28, num_classes=10)
def _load_fashion_mnist(req: LoadRequest) -> SourceSplits:
    searched = _candidates(req, FASHION_MNIST_SYSTEM_DIR)
    partial = []
    for folder in searched:
        if not folder.is_dir():
            continue
        files, missing = _find_idx_files(folder, req.with_test)
        if not missing:
            break
        if files:
            partial.append(f"{folder} lacks {', '.join(missing)}")
    else:
        detail = ("\nIncomplete folders: " + "; ".join(partial)) if partial else ""
        files = ", ".join(s + ".gz" for s in FASHION_MNIST_FILES.values())
        fix = (f"data_dir={str(req.data_dir)!r} was given, so only it is searched: put the four files {files} "
               "there, or leave data_dir out to use an installed copy (`apt-get install dataset-fashion-mnist`)."
               if req.data_dir is not None else
               "Install it with `apt-get install dataset-fashion-mnist` (puts it in the system folder above), or "
               f"put the four files {files} in one of the folders above (e.g. pass data_dir= or set "
               "FUSIONKD_DATA).")
        raise DatasetNotFoundError(
            "Fashion-MNIST not found. Searched:\n" + _searched(searched) + detail + "\n" + fix
            + (" Automatic download is not supported for fashion-mnist." if req.download else "")
        )
    logger.info("reading Fashion-MNIST from %s", folder)
    x_tr, y_tr = read_idx_pair(files["train_images"], files["train_labels"])
    if req.with_test:
        x_te, y_te = read_idx_pair(files["test_images"], files["test_labels"])
    else:  # the test files are not opened at all
        x_te, y_te = x_tr[:0], y_tr[:0]
    for path, y in ((files["train_labels"], y_tr), (files.get("test_labels"), y_te)):
        if y.size == 0:
            continue
        if y.min() < 0 or y.max() >= 10:
            raise DataFormatError(f"{path}: labels outside 0..9 ({y.min()}..{y.max()})")
    return SourceSplits(
        train=_dataset(x_tr[:, None], y_tr),
        test=_dataset(x_te[:, None], y_te),
        classes=list(FASHION_MNIST_CLASSES),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


# ------------------------------------------------------------------------------------------ cifar


@dataclass(frozen=True)
class CifarSpec:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    url: str
    md5: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _cifar_folder(spec: CifarSpec, candidate: Path) -> Path | None:
    """``candidate/<spec.folder>`` or ``candidate`` itself if it holds the batches."""
    for folder in (candidate / spec.folder, candidate):
        if (folder / spec.test_file).is_file() and (folder / spec.meta_file).is_file():
            return folder
    return None


def _load_cifar(req: LoadRequest) -> SourceSplits:
    spec = CIFAR_SPECS[req.name]
    searched = _candidates(req)
    target = req.data_dir if req.data_dir is not None else data_root() / req.name
    hint = (f"Download {spec.url} (md5 {spec.md5}) and either extract it into one of the searched folders "
            f"(so that <folder>/{spec.folder}/{spec.test_file} exists) or leave the .tar.gz there; it is "
            "verified and extracted on the next load.")
    folder = next((f for f in map(lambda c: _cifar_folder(spec, c), searched) if f is not None), None)
    if folder is None:
        archive = next((c / spec.archive for c in searched if (c / spec.archive).is_file()), None)
        if archive is None and req.download:
            archive = dl.fetch(spec.url, target / spec.archive, spec.md5,
                               manual_hint=f"{hint} Searched:\n{_searched(searched)}")
        if archive is not None:
            dl.verify(archive, spec.md5, manual_hint=hint)
            logger.info("extracting %s", archive)
            dl.safe_extract(archive, archive.parent)
            folder = _cifar_folder(spec, archive.parent)
            if folder is None:
                raise DataFormatError(
                    f"{archive}: extracted, but {spec.folder}/{spec.test_file} is not inside; "
                    "is it the official archive?"
                )
        else:
            raise DatasetNotFoundError(
                f"{req.name} not found. Searched:\n{_searched(searched)}\n{hint} "
                "Or pass download=True on a machine with internet access."
            )
    logger.info("reading %s from %s", req.name, folder)
    missing = [f for f in spec.train_files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{folder}: missing training batch(es) {missing}; the extraction is "
                                   f"incomplete. {hint}")
    parts = [load_cifar_pickle(folder / f, spec.label_key) for f in spec.train_files]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = load_cifar_pickle(folder / spec.test_file, spec.label_key)
    classes = load_cifar_names(folder / spec.meta_file, spec.names_key)
    if len(classes) != spec.num_classes:
        raise DataFormatError(
            f"{folder / spec.meta_file}: {len(classes)} class names, expected {spec.num_classes}"
        )
    for y, f in ((y_tr, "training batches"), (y_te, spec.test_file)):
        if y.min() < 0 or y.max() >= spec.num_classes:
            raise DataFormatError(f"{folder}: {f} has labels outside 0..{spec.num_classes - 1}")
    return SourceSplits(train=_dataset(x_tr, y_tr), test=_dataset(x_te, y_te), classes=classes,
                        mean=spec.mean, std=spec.std)


register_dataset("cifar10", "CIFAR-10: 50k/10k 32x32 RGB images, 10 classes (official python batches)",
                 in_chans=3, image_size=32, num_classes=10)(_load_cifar)
register_dataset("cifar100", "CIFAR-100: 50k/10k 32x32 RGB images, 100 fine classes (official python "
                 "batches)", in_chans=3, image_size=32, num_classes=100)(_load_cifar)


# ---------------------------------------------------------------------------------- image folders


def _cache_locations(req: LoadRequest, root: Path) -> list[Path]:
    if req.cache_dir is not None:
        return [req.cache_dir]
    locs = [root / ".fusionkd_cache"]
    if os.environ.get("FUSIONKD_DATA"):
        locs.append(data_root() / ".cache")
    locs.append(Path.home() / ".cache" / "fusionkd")
    return locs


def _decode_tree(req: LoadRequest, root: Path, splits: dict[str, Path], classes: list[str],
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
    cache = ArrayCache(f"{req.name}-{root_id}-", key, _cache_locations(req, root))
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
    return {s: _dataset(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in files}, all_gray


STORAGES = ("memory", "store")
#: ``progress(done, total)`` for a store being prepared in this context (set by ``prepare_dataset``)
PREPARE_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("fusionkd_prepare_progress", default=None)


def _default_workers() -> int:
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
        from .store_loader import CROPS

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
    locations = _cache_locations(req, root)
    for loc in locations:
        if (loc / name / "manifest.json").is_file():
            return loc / name
    for loc in locations:
        if _writable_dir(loc):
            return loc / name
    raise DatasetNotFoundError(f"no writable place for the store of {req.name} among {[str(p) for p in locations]}; "
                               "pass store_dir=<folder>")


def store_fingerprint(name: str, files: FileSplits, resolution: int) -> str:
    """What a store is built from: dataset name, resolution, classes and every file's name, size and time."""
    return fingerprint([name, str(resolution), ",".join(files.classes)], sorted(files.splits.items()))


def _materialise(req: LoadRequest, files: FileSplits, opts: StoreOptions, default_size: int, *,
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
                          workers=opts.workers or _default_workers(), progress=PREPARE_PROGRESS.get())
        store = Store(path, dataset=req.name, resolution=resolution, fingerprint=key)
    return _store_source(store, opts, out_size)


def _store_source(store: Store, opts: StoreOptions, out_size: int) -> StoreSource:
    kw = dict(crop=opts.crop, output_size=out_size, workers=opts.workers or _default_workers())
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
    return _store_source(store, opts, out_size)


CINIC10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Published statistics of CINIC-10 (train + valid + test), https://github.com/BayesWatch/cinic-10.
CINIC10_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC10_STD = (0.24205776, 0.23828046, 0.25874835)


@register_dataset("cinic10", "CINIC-10: 90k/90k/90k 32x32 RGB train/valid/test PNGs, CIFAR-10 classes",
                  in_chans=3, image_size=32, num_classes=10)
def _load_cinic10(req: LoadRequest) -> SourceSplits:
    searched = _candidates(req)
    root = next((c for c in searched if all((c / s).is_dir() for s in ("train", "valid", "test"))), None)
    if root is None:
        raise DatasetNotFoundError(
            "CINIC-10 not found (a folder with train/, valid/ and test/, each holding the 10 class folders "
            f"of PNGs). Searched:\n{_searched(searched)}\nDownload CINIC-10.tar.gz from "
            "https://datashare.ed.ac.uk/handle/10283/3192 and extract it into one of those folders."
            + (" Automatic download is not supported for cinic10." if req.download else "")
        )
    size = req.image_size or 32
    folders = {s: root / s for s in ("train", "valid", "test")}
    splits, _ = _decode_tree(req, root, folders, list(CINIC10_CLASSES), size, all_classes_everywhere=True)
    return SourceSplits(train=splits["train"], val=splits["valid"], test=splits["test"],
                        classes=list(CINIC10_CLASSES),
                        mean=CINIC10_MEAN if size == 32 else None, std=CINIC10_STD if size == 32 else None)


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (N, 3, H, W) -> (N, 1, H, W) with Pillow's ``convert("L")`` weights (ITU-R 601-2)."""
    w = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
    return ((images.to(torch.int32) * w).sum(1, keepdim=True) + 32768).bitwise_right_shift(16).to(torch.uint8)


@register_dataset("imagefolder", "any root/{train,test[,val]}/<class>/*.png|jpg tree, resized to image_size "
                  "(default 32)", in_chans=None, image_size=None, num_classes=None)
def _load_imagefolder(req: LoadRequest, *, channels: str = "auto", storage: str = "memory",
                      store_dir: str | None = None, store_size: int | None = None, crop: str = "pad",
                      workers: int | None = None) -> SourceSplits | StoreSource:
    """``channels``: ``"auto"`` (grayscale when every image is single-channel, else RGB), ``"rgb"`` or
    ``"grayscale"``. ``storage="store"`` keeps the images in a prepared store on disk (RGB; see
    docs/data.md) instead of memory."""
    if channels not in ("auto", "rgb", "grayscale"):
        raise ValueError(f"imagefolder channels must be 'auto', 'rgb' or 'grayscale', got {channels!r}")
    opts = StoreOptions(storage, store_dir, store_size, crop, workers)
    opts.check("imagefolder")
    if storage == "store" and channels == "grayscale":
        raise ValueError("imagefolder: a store holds RGB images; channels='grayscale' needs storage='memory'")
    if req.data_dir is None:
        raise DatasetNotFoundError(
            "imagefolder needs data_dir=<root>, a folder holding train/<class>/*.png and test/<class>/*.png "
            "(optionally val/<class>/*.png); jpg/jpeg work too"
        )
    root = req.data_dir
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        stored = open_store_source(req, opts, 32)
        if stored is not None:
            return stored
        raise DatasetNotFoundError(
            f"{root}: missing split folder(s) {missing}; expected {root}/train/<class>/*.png and "
            f"{root}/test/<class>/*.png (optionally {root}/val/<class>/*.png)"
        )
    classes = list_classes(root / "train")
    if not classes:
        raise DataFormatError(f"{root / 'train'}: no class folders")
    if len(classes) < 2:
        raise DataFormatError(f"{root / 'train'}: one class folder ({classes[0]!r}); a classifier needs at least "
                              "two classes, one folder per class")
    folders = {"train": root / "train", "test": root / "test"}
    val_name = next((v for v in ("val", "valid") if (root / v).is_dir()), None)
    if val_name:
        folders["val"] = root / val_name
    files = {split: scan_image_tree(folder, classes, require_all=split == "train") for split, folder in folders.items()}
    if storage == "store":
        return _materialise(req, FileSplits(root, classes, files), opts, 32)
    splits, all_gray = decode_files(req, root, files, classes, req.image_size or 32)
    gray = channels == "grayscale" or (channels == "auto" and all_gray)
    if gray:
        splits = {s: ArrayDataset(_to_gray(d.images), d.labels) for s, d in splits.items()}
    return SourceSplits(train=splits["train"], test=splits["test"], val=splits.get("val"), classes=classes)


# ------------------------------------------------------------------------------------------ digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 1797  # fixed: the digits test split never changes


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (1797, 8, 8) images scaled from 0..16 to 0..255, int64 labels (parsed
    once per process; callers must not modify them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'fusionkd[digits]')") from e
    d = load_digits()
    x = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x.flags.writeable = False
    y = np.asarray(d.target, dtype=np.int64)
    y.flags.writeable = False
    return x, y


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1,797 images), upsampled to 16x16, fixed "
                  "80/20 split", in_chans=1, image_size=16, num_classes=10)
def _load_digits(req: LoadRequest) -> SourceSplits:
    x, y = _digits_arrays()
    images = resize_images(torch.from_numpy(x[:, None].copy()), req.image_size or 16, mode="nearest")
    tr, te = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED, 10)
    labels = torch.from_numpy(y.copy())
    return SourceSplits(train=ArrayDataset(images[tr], labels[tr]), test=ArrayDataset(images[te], labels[te]),
                        classes=[str(i) for i in range(10)])


# --------------------------------------------------------------------------------------- synthetic

SYNTHETIC_SEED = 20250101


def make_synthetic(n: int, prototypes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images: the class prototype plus uniform pixel noise in ``[-64, 64]`` (std 37 grey levels),
    balanced labels in random order.

    Args:
        prototypes: int16 ``(K, C, S, S)`` class patterns in grey levels.

    Returns:
        ``(images uint8 (n, C, S, S), labels int64 (n,))``.
    """
    labels = rng.permutation(np.arange(n) % len(prototypes)).astype(np.int64)
    images = rng.integers(-64, 65, (n, *prototypes.shape[1:]), dtype=np.int16)
    images += prototypes[labels]
    return np.clip(images, 0, 255).astype(np.uint8), labels


@register_dataset("synthetic", "deterministic class-patterned random images for tests and smoke runs "
                  "(default 10 classes, 3x32x32, 500/200)", in_chans=3, image_size=32, num_classes=10)
def _load_synthetic(req: LoadRequest, *, num_classes: int = 10, in_chans: int = 3, train_size: int = 500,
                    test_size: int = 200) -> SourceSplits:
    """Each class has a smooth random pattern (a 4x4 grid of random grey levels per channel, bilinearly
    upsampled, so it stays recognisable after crops and flips); images add pixel noise to it. Everything
    depends only on the options and ``image_size``, never on ``seed``."""
    for key, value, lo in (("num_classes", num_classes, 2), ("in_chans", in_chans, 1),
                           ("train_size", train_size, 1), ("test_size", test_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"synthetic {key} must be an int >= {lo}, got {value!r}")
    if train_size < num_classes:
        raise ValueError(f"synthetic train_size ({train_size}) must be >= num_classes ({num_classes})")
    size = req.image_size or 32
    rng = np.random.default_rng(SYNTHETIC_SEED)
    grid = torch.from_numpy(rng.random((num_classes, in_chans, 4, 4), dtype=np.float32))
    smooth = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    prototypes = (smooth * 175.0 + 40.0).round().to(torch.int16).numpy()
    x_tr, y_tr = make_synthetic(train_size, prototypes, rng)
    x_te, y_te = make_synthetic(test_size, prototypes, rng)
    return SourceSplits(train=_dataset(x_tr, y_tr), test=_dataset(x_te, y_te),
                        classes=[f"class_{i}" for i in range(num_classes)])
