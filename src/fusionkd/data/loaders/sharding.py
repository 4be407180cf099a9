"""What both loaders share: one epoch's plan (:class:`EpochPlan`) and this rank's shard of the
epoch's permutation (:class:`EpochSharding`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..mixing import MixDraws, RandAugmentDraws
from .augment import AugmentDraws, derive_seed

logger = logging.getLogger(__name__)


@dataclass
class EpochPlan:
    """Everything random about one epoch of one rank, on the CPU.

    Attributes:
        indices: int64 ``(num_samples,)``: dataset indices in the order they are served.
        draws: augmentation of each served sample (position-aligned with ``indices``); None in eval mode.
        randaugment: the RandAugment ops of each served sample, when on.
        mix: the MixUp/CutMix draws of each batch, when on.
    """

    indices: torch.Tensor
    draws: AugmentDraws | None
    randaugment: RandAugmentDraws | None = None
    mix: MixDraws | None = None


class EpochSharding:
    """What :class:`DeviceLoader` and :class:`~fusionkd.data.store_loader.StoreLoader` share: this rank's
    share of ``n`` samples, the batch count, the epoch to serve next and the training permutation, all a
    function of ``(seed, epoch, rank)`` so that exact resume and rank sharding hold for both."""

    def _init_sharding(self, n: int, batch_size: int, train: bool, drop_last: bool | None, seed: int, rank: int,
                       world_size: int) -> None:
        self.train = bool(train)
        self.batch_size = batch_size
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self._size = n
        if self.train:
            self.num_samples = n // world_size if world_size > 1 else n
        else:
            self.num_samples = len(range(rank, n, world_size))
        self._num_batches = (self.num_samples // batch_size if self.drop_last
                             else math.ceil(self.num_samples / batch_size))
        if self._num_batches == 0 and self.num_samples > 0:
            # not an error here: the caller checks len(loader) and can say which setting to change
            logger.warning("batch_size=%d exceeds the %d samples of this rank and drop_last is on: the loader "
                           "yields no batch; lower batch_size or pass drop_last=False", batch_size, self.num_samples)
        self._epoch = 0
        self._epoch_set = True  # the first iteration uses epoch 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration serves (or the one being served)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` next: its order and augmentation depend only on ``(seed, epoch, rank)``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        self._epoch_set = True

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._num_batches

    def _train_permutation(self, epoch: int) -> torch.Tensor:
        """The dataset indices this rank serves in training epoch ``epoch``, in order."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(self._size, generator=g)
        if self.world_size > 1:
            perm = perm[: self.num_samples * self.world_size][self.rank:: self.world_size]
        used = self._num_batches * self.batch_size if self.drop_last else self.num_samples
        return perm[:used]
