"""Any ``root/{train,test[,val]}/<class>/*.png|jpg`` tree, in memory or in a store."""

from __future__ import annotations

import torch

from ...errors import DatasetNotFoundError
from ..containers import ArrayDataset, SourceSplits, StoreSource
from ..formats import DataFormatError
from ..images import list_classes, scan_image_tree
from ..layouts import FileSplits
from .base import LoadRequest, register_dataset
from .storage import StoreOptions, decode_files, materialise, open_store_source


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
        return materialise(req, FileSplits(root, classes, files), opts, 32)
    splits, all_gray = decode_files(req, root, files, classes, req.image_size or 32)
    gray = channels == "grayscale" or (channels == "auto" and all_gray)
    if gray:
        splits = {s: ArrayDataset(_to_gray(d.images), d.labels) for s, d in splits.items()}
    return SourceSplits(train=splits["train"], test=splits["test"], val=splits.get("val"), classes=classes)
