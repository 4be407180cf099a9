"""The dataset registry, the helpers every dataset shares, and :func:`load_dataset` (how datasets are
loaded, split and looked up: the package docstring, :mod:`fusionkd.data.datasets`)."""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...registry import Registry
from ..containers import ArrayDataset, DatasetInfo, DataSplits, SourceSplits, StoreSource
from ..splits import stratified_split, stratified_subset

logger = logging.getLogger(__name__)


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


def dataset_options(name: str) -> list[str]:
    """The options dataset ``name`` accepts (``load_dataset(name, **options)``): its loader's keyword-only
    parameters, in order. Raises :class:`~fusionkd.registry.UnknownNameError` for an unknown name."""
    return [p.name for p in inspect.signature(DATASETS.entry(name).obj).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]



def data_root() -> Path:
    """``$FUSIONKD_DATA`` if set, else ``./data``: the default parent folder of every dataset."""
    env = os.environ.get("FUSIONKD_DATA")
    return Path(env).expanduser() if env else Path("data")


def candidate_dirs(req: LoadRequest, *system: Path) -> list[Path]:
    """Where to look for the files: a ``data_dir`` the user gave is the only place searched (it is used or
    refused, never silently replaced by another copy); otherwise ``$FUSIONKD_DATA/<name>`` and the system
    folders."""
    if req.data_dir is not None:
        return [req.data_dir] if req.data_dir.name == req.name else [req.data_dir, req.data_dir / req.name]
    out: list[Path] = [data_root() / req.name]
    out += list(system)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def format_searched(paths: Sequence[Path]) -> str:
    return "\n".join(f"  - {p}" for p in paths)


def _tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).to(dtype)


def as_dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
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
    accepted = dataset_options(name)
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
