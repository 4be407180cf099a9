"""CINIC-10: ``train/``, ``valid/`` and ``test/`` trees of 32x32 PNGs."""

from __future__ import annotations

from ...errors import DatasetNotFoundError
from ..containers import SourceSplits
from .base import LoadRequest, candidate_dirs, format_searched, register_dataset
from .storage import decode_tree

CINIC10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Published statistics of CINIC-10 (train + valid + test), https://github.com/BayesWatch/cinic-10.
CINIC10_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC10_STD = (0.24205776, 0.23828046, 0.25874835)


@register_dataset("cinic10", "CINIC-10: 90k/90k/90k 32x32 RGB train/valid/test PNGs, CIFAR-10 classes",
                  in_chans=3, image_size=32, num_classes=10)
def _load_cinic10(req: LoadRequest) -> SourceSplits:
    searched = candidate_dirs(req)
    root = next((c for c in searched if all((c / s).is_dir() for s in ("train", "valid", "test"))), None)
    if root is None:
        raise DatasetNotFoundError(
            "CINIC-10 not found (a folder with train/, valid/ and test/, each holding the 10 class folders "
            f"of PNGs). Searched:\n{format_searched(searched)}\nDownload CINIC-10.tar.gz from "
            "https://datashare.ed.ac.uk/handle/10283/3192 and extract it into one of those folders."
            + (" Automatic download is not supported for cinic10." if req.download else "")
        )
    size = req.image_size or 32
    folders = {s: root / s for s in ("train", "valid", "test")}
    splits, _ = decode_tree(req, root, folders, list(CINIC10_CLASSES), size, all_classes_everywhere=True)
    return SourceSplits(train=splits["train"], val=splits["valid"], test=splits["test"],
                        classes=list(CINIC10_CLASSES),
                        mean=CINIC10_MEAN if size == 32 else None, std=CINIC10_STD if size == 32 else None)
