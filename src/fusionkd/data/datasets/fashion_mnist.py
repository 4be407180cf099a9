"""Fashion-MNIST: the four IDX files."""

from __future__ import annotations

import logging
from pathlib import Path

from ...errors import DatasetNotFoundError
from ..containers import SourceSplits
from ..formats import DataFormatError, read_idx_pair
from .base import LoadRequest, as_dataset, candidate_dirs, format_searched, register_dataset

logger = logging.getLogger(__name__)


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
    searched = candidate_dirs(req, FASHION_MNIST_SYSTEM_DIR)
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
            "Fashion-MNIST not found. Searched:\n" + format_searched(searched) + detail + "\n" + fix
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
        train=as_dataset(x_tr[:, None], y_tr),
        test=as_dataset(x_te[:, None], y_te),
        classes=list(FASHION_MNIST_CLASSES),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )
