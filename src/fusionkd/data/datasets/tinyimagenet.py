"""TinyImageNet in its official layout (``tiny-imagenet-200/``)."""

from __future__ import annotations

from ..containers import SourceSplits, StoreSource
from ..layouts import TINY_FOLDER, read_tinyimagenet
from .base import LoadRequest, register_dataset
from .official import load_official, root_finder
from .storage import StoreOptions

_tiny_root = root_finder(TINY_FOLDER, "wnids.txt", "train")


@register_dataset("tinyimagenet", "TinyImageNet: 100k train / 10k val (as test) 64x64 JPEGs, 200 classes "
                  "(official tiny-imagenet-200/ layout); a prepared store by default", in_chans=3, image_size=64,
                  num_classes=200)
def _load_tinyimagenet(req: LoadRequest, *, storage: str = "store", store_dir: str | None = None,
                       store_size: int | None = None, crop: str = "pad", workers: int | None = None
                       ) -> SourceSplits | StoreSource:
    return load_official(req, StoreOptions(storage, store_dir, store_size, crop, workers), 64, _tiny_root,
                         "a tiny-imagenet-200/ folder with wnids.txt, words.txt, train/ and val/", "Download "
                         "http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into one of those folders.",
                         read_tinyimagenet, 200)
