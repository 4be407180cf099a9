"""The containers every part of :mod:`fusionkd.data` passes around, and the shared constants.

The lowest module of the package: datasets and loaders both import it; it imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .store_reader import StoreSplit

__all__ = ["CROPS", "IMAGENET_MEAN", "IMAGENET_STD", "ArrayDataset", "DataSplits", "DatasetInfo", "SourceSplits",
           "StoreSource"]

#: The training crops of the loaders: the CIFAR-style pad crop, the ImageNet-style random-resized crop.
CROPS = ("pad", "random-resized")

#: The usual ImageNet statistics (torchvision's): the ``imagenet`` dataset's, and ``normalize=imagenet``'s.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ArrayDataset:
    """One split held entirely in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, contiguous.
        labels: int64 ``(N,)``, class ids.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "images must be uint8 of shape (N, C, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, indices: np.ndarray | torch.Tensor) -> ArrayDataset:
        """A new dataset holding the samples at ``indices`` (int (M,)), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.images.device.type == "cpu":  # numpy's take: fast and single-threaded
            return ArrayDataset(torch.from_numpy(self.images.numpy()[idx]), torch.from_numpy(self.labels.numpy()[idx]))
        t = torch.as_tensor(idx, device=self.images.device)
        return ArrayDataset(self.images.index_select(0, t), self.labels.index_select(0, t))

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """int64 ``(num_classes,)``: images per class."""
        return torch.bincount(self.labels, minlength=num_classes)


@dataclass
class DatasetInfo:
    """What a model and a checkpoint need to know about the data.

    Attributes:
        name: registry name, e.g. ``"fashion-mnist"``.
        classes: class names, index = label.
        mean, std: per channel, for pixels scaled to ``[0, 1]``.
        in_chans: channels C.
        image_size: H == W of the loaded images (of the batches, for a store).
        stored_size: side the images are stored at when evaluation centre-crops ``image_size`` from them
            (a store served with the random-resized crop, e.g. 256 for 224); None: they are ``image_size``.
    """

    name: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    image_size: int
    stored_size: int | None = None

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per channel), got "
                             f"{len(self.mean)} / {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean/std must be finite numbers, got mean {self.mean}, std {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (lists, not tuples)."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            **({"stored_size": self.stored_size} if self.stored_size is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer checkpoints), missing ones raise."""
        required = ("name", "classes", "mean", "std", "in_chans", "image_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"dataset info is missing {missing} (has {sorted(d)})")
        return cls(
            name=str(d["name"]),
            classes=list(d["classes"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            in_chans=int(d["in_chans"]),
            image_size=int(d["image_size"]),
            stored_size=int(d["stored_size"]) if d.get("stored_size") is not None else None,
        )


@dataclass
class DataSplits:
    """The result of :func:`load_dataset`: in-memory splits, or :class:`~fusionkd.data.StoreSplit` s of a
    prepared store (``storage="store"``)."""

    train: ArrayDataset | StoreSplit
    val: ArrayDataset | StoreSplit | None
    test: ArrayDataset | StoreSplit
    info: DatasetInfo


@dataclass
class StoreSource:
    """What a loader returns when the images stay in a store on disk (see ``SourceSplits``)."""

    train: StoreSplit
    test: StoreSplit
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: StoreSplit | None = None


@dataclass
class SourceSplits:
    """What a dataset loader returns, before validation carve-out and subsetting.

    ``mean``/``std`` None means "compute them from ``train``". ``val`` is a validation split shipped with
    the dataset (used instead of carving one).
    """

    train: ArrayDataset
    test: ArrayDataset
    classes: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    val: ArrayDataset | None = None
