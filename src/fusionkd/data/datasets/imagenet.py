"""ImageNet ILSVRC-2012 in its official layout (``train/<wnid>/``, ``val/``)."""

from __future__ import annotations

from ..containers import IMAGENET_MEAN, IMAGENET_STD, SourceSplits, StoreSource
from ..layouts import find_imagenet_root, read_imagenet
from .base import LoadRequest, register_dataset
from .official import load_official
from .storage import StoreOptions


@register_dataset("imagenet", "ImageNet ILSVRC-2012: 1.28M train / 50k val (as test), 1000 classes "
                  "(train/<wnid>/, val/ sorted or flat with labels), random-resized crop to 224 px from a "
                  "prepared store", in_chans=3, image_size=224, num_classes=1000)
def _load_imagenet(req: LoadRequest, *, storage: str = "store", store_dir: str | None = None,
                   store_size: int | None = None, crop: str = "random-resized", workers: int | None = None
                   ) -> SourceSplits | StoreSource:
    return load_official(req, StoreOptions(storage, store_dir, store_size, crop, workers), 224, find_imagenet_root,
                         "a folder with train/<wnid>/*.JPEG and val/ (or the Kaggle ILSVRC/Data/CLS-LOC/ inside it)",
                         "Get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (or the "
                         "Kaggle imagenet-object-localization-challenge), extract train into train/<wnid>/ and val "
                         "into val/ (sorted into <wnid>/, or flat with LOC_val_solution.csv or the devkit's ground "
                         "truth).",
                         read_imagenet, 1000, mean=IMAGENET_MEAN, std=IMAGENET_STD)
