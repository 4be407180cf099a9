"""The store loader's old home: :class:`StoreLoader` and :func:`make_loader` now live in
:mod:`fusionkd.data.loaders.store`, ``CROPS`` in :mod:`fusionkd.data.containers`; importable from here too."""

from .containers import CROPS
from .loaders.store import (
           MixingStoreLoader,
           ResizedCropDraws,
           StoreLoader,
           draw_resized_crops,
           make_loader,
           resized_crop,
)

__all__ = ["CROPS", "MixingStoreLoader", "ResizedCropDraws", "StoreLoader", "draw_resized_crops", "make_loader",
           "resized_crop"]
