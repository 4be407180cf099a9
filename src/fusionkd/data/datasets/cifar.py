"""CIFAR-10 and CIFAR-100: the official python batches, optionally downloaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DatasetNotFoundError
from .. import download as dl
from ..containers import SourceSplits
from ..formats import DataFormatError, load_cifar_names, load_cifar_pickle
from .base import LoadRequest, as_dataset, candidate_dirs, data_root, format_searched, register_dataset

logger = logging.getLogger(__name__)


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
    searched = candidate_dirs(req)
    target = req.data_dir if req.data_dir is not None else data_root() / req.name
    hint = (f"Download {spec.url} (md5 {spec.md5}) and either extract it into one of the searched folders "
            f"(so that <folder>/{spec.folder}/{spec.test_file} exists) or leave the .tar.gz there; it is "
            "verified and extracted on the next load.")
    folder = next((f for f in map(lambda c: _cifar_folder(spec, c), searched) if f is not None), None)
    if folder is None:
        archive = next((c / spec.archive for c in searched if (c / spec.archive).is_file()), None)
        if archive is None and req.download:
            archive = dl.fetch(spec.url, target / spec.archive, spec.md5,
                               manual_hint=f"{hint} Searched:\n{format_searched(searched)}")
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
                f"{req.name} not found. Searched:\n{format_searched(searched)}\n{hint} "
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
    return SourceSplits(train=as_dataset(x_tr, y_tr), test=as_dataset(x_te, y_te), classes=classes,
                        mean=spec.mean, std=spec.std)


register_dataset("cifar10", "CIFAR-10: 50k/10k 32x32 RGB images, 10 classes (official python batches)",
                 in_chans=3, image_size=32, num_classes=10)(_load_cifar)
register_dataset("cifar100", "CIFAR-100: 50k/10k 32x32 RGB images, 100 fine classes (official python "
                 "batches)", in_chans=3, image_size=32, num_classes=100)(_load_cifar)
