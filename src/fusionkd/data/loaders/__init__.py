"""The batch loaders: :class:`DeviceLoader` (a split held on the device) and :class:`StoreLoader` (a split
read from a store on disk), what they share (:mod:`.sharding`, :mod:`.augment`), and :func:`make_loader`.
"""

from .augment import (
    PADDING_MODES,
    AugmentDraws,
    apply_cutout,
    augment_batch,
    crop_flip,
    cutout_mask,
    derive_seed,
    draw_augmentation,
    normalize,
    scale_shift,
)
from .device import DeviceLoader
from .sharding import EpochPlan, EpochSharding
from .store import MixingStoreLoader, ResizedCropDraws, StoreLoader, draw_resized_crops, make_loader, resized_crop

__all__ = [
    "PADDING_MODES",
    "AugmentDraws",
    "DeviceLoader",
    "EpochPlan",
    "EpochSharding",
    "MixingStoreLoader",
    "ResizedCropDraws",
    "StoreLoader",
    "apply_cutout",
    "augment_batch",
    "crop_flip",
    "cutout_mask",
    "derive_seed",
    "draw_augmentation",
    "draw_resized_crops",
    "make_loader",
    "normalize",
    "resized_crop",
    "scale_shift",
]
