"""CUB-200-2011 in its official layout (``CUB_200_2011/``)."""

from __future__ import annotations

from ..containers import SourceSplits, StoreSource
from ..layouts import CUB_FOLDER, read_cub200
from .base import LoadRequest, register_dataset
from .official import load_official, root_finder
from .storage import StoreOptions

_cub_root = root_finder(CUB_FOLDER, "images.txt", "images")


@register_dataset("cub200", "CUB-200-2011: 5,994 train / 5,794 test bird photos, 200 classes (official "
                  "CUB_200_2011/ layout), random-resized crop to 224 px from a prepared store", in_chans=3,
                  image_size=224, num_classes=200)
def _load_cub200(req: LoadRequest, *, storage: str = "store", store_dir: str | None = None,
                 store_size: int | None = None, crop: str = "random-resized", workers: int | None = None
                 ) -> SourceSplits | StoreSource:
    return load_official(req, StoreOptions(storage, store_dir, store_size, crop, workers), 224, _cub_root,
                         "a CUB_200_2011/ folder with images.txt, image_class_labels.txt, train_test_split.txt, "
                         "classes.txt and images/", "Download CUB_200_2011.tgz from "
                         "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it into one of those "
                         "folders.",
                         read_cub200, 200)
