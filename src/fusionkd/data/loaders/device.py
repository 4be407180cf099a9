"""A batch loader that keeps the whole split on the device and augments whole batches with tensor ops.

Per epoch, :class:`DeviceLoader` draws on the CPU, from generators seeded by ``(seed, epoch[, rank])``
only, a permutation of the split and every sample's augmentation parameters (crop offsets, flips, cutout
centres), moves them to the device once, and then per batch runs a handful of tensor ops on the device:
``index_select`` of the batch, one ``gather`` that performs crop + padding + flip together
(:func:`crop_flip`), a fused uint8 -> float32 normalisation, and the cutout mask. There is no per-sample
Python code, no worker process and no host synchronisation inside an epoch; CPU and GPU runs see the same
samples, crops, flips and cutouts, and a resumed run reproduces its batches exactly without any saved RNG
state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ..containers import ArrayDataset, DatasetInfo
from ..mixing import MAX_MAGNITUDE, RandAugmentDraws, draw_mixing, draw_randaugment, mix_batch
from .augment import PADDING_MODES, AugmentDraws, derive_seed, draw_augmentation, scale_shift, transform_batch
from .sharding import EpochPlan, EpochSharding


class DeviceLoader(EpochSharding):
    """Iterates over normalised (and, for training, augmented) batches of an in-memory split.

    Normalisation comes from the second argument: a :class:`DatasetInfo` (``splits.info``) or a
    ``(mean, std)`` pair of per-channel sequences for pixels in ``[0, 1]``::

        train_loader = DeviceLoader(splits.train, splits.info, 128, train=True, device="cuda")
        test_loader = DeviceLoader(splits.test, splits.info, 512, train=False, device="cuda")
        for epoch in range(start_epoch, epochs):
            train_loader.set_epoch(epoch)
            for images, labels in train_loader:  # float32 (B, C, H, W), int64 (B,), on the device
                ...

    Training mode (``train=True``) shuffles with a ``torch.Generator`` seeded from ``(seed, epoch)``
    (identical on every rank), keeps this rank's shard, and augments each batch: random crop with
    ``crop_padding`` pixels of ``padding_mode`` padding, horizontal flip (``flip``), cutout of a
    ``cutout``-pixel square (0 = off), all drawn from a generator seeded from ``(seed, epoch, rank)``.
    Evaluation mode serves the split in order, unaugmented, never dropping a sample.

    Sharding (``world_size > 1``): in training, the epoch's permutation is cut to a multiple of
    ``world_size`` (the ``N % world_size`` samples at its tail, different ones each epoch, are skipped) and
    rank ``r`` takes positions ``r, r + world_size, ...``: every rank sees the same number of samples and
    ranks are disjoint. In evaluation, rank ``r`` takes indices ``r, r + world_size, ...`` of the split
    without padding (shard sizes differ by at most one), so summing per-rank counts gives exact metrics
    over every image once.

    Epochs: :meth:`set_epoch` selects the epoch; iterating again without calling it moves to the next
    epoch, so a plain ``for epoch in ...: for batch in loader`` still reshuffles.

    Args:
        data: the split; its uint8 images are copied to ``device`` once (shared when already there).
        norm: :class:`DatasetInfo` or ``(mean, std)``.
        batch_size: samples per batch.
        train: training (shuffle + augment) or evaluation mode.
        device: where batches are produced.
        crop_padding: crop padding in pixels (0 = no crop); training only.
        padding_mode: ``"zero"`` or ``"reflect"``.
        flip: random horizontal flips; training only.
        cutout: side of the cutout square in pixels, 0 = off; training only.
        mixup, cutmix: Beta(alpha, alpha) parameters of MixUp / CutMix, 0 = off; training only. When either
            is on, every training batch's labels are soft targets ``(B, num_classes)`` float32
            (:mod:`fusionkd.data.mixing`), and ``num_classes`` is required.
        mix_prob: probability that a batch is mixed.
        randaugment: RandAugment ops per image, 0 = off; ``randaugment_magnitude`` in 0..30.
        drop_last: drop the last incomplete batch; default True in training, False in evaluation.
        seed: base seed of the permutation and the augmentation.
        rank, world_size: this process's shard.
        channels_last: return batches in ``torch.channels_last`` memory format.
        with_indices: training batches are ``(images, labels, indices)``, ``indices`` the int64 ``(B,)``
            dataset indices of the batch on the device (for a method with per-sample state, e.g. CRD's
            memory bank); not with MixUp / CutMix, whose images are two samples each.

    Attributes:
        num_samples: samples this rank serves per epoch (incomplete last batch included unless dropped).

    ``len(loader)`` is the number of batches per epoch for this rank; it is 0 (with a logged warning) when
    ``drop_last`` is on and ``batch_size`` exceeds ``num_samples``: check it before training.
    """

    def __init__(
        self,
        data: ArrayDataset,
        norm: DatasetInfo | tuple[Sequence[float], Sequence[float]],
        batch_size: int,
        *,
        train: bool,
        device: str | torch.device = "cpu",
        crop_padding: int = 4,
        padding_mode: str = "zero",
        flip: bool = True,
        cutout: int = 0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_prob: float = 1.0,
        randaugment: int = 0,
        randaugment_magnitude: int = 9,
        num_classes: int | None = None,
        drop_last: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        with_indices: bool = False,
    ) -> None:
        if isinstance(norm, DatasetInfo):
            mean, std = norm.mean, norm.std
        elif isinstance(norm, (tuple, list)) and len(norm) == 2:
            mean, std = norm
        else:
            raise TypeError(f"norm must be a DatasetInfo or a (mean, std) pair, got {type(norm).__name__}")
        n, c, h, w = data.images.shape
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        if padding_mode == "reflect" and crop_padding >= min(h, w):
            raise ValueError(
                f"reflect padding needs crop_padding < image size ({min(h, w)}), got {crop_padding}"
            )
        if not isinstance(cutout, int) or cutout < 0:
            raise ValueError(f"cutout must be an int >= 0 (0 = off), got {cutout!r}")

        if mixup < 0 or cutmix < 0 or not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mixup and cutmix must be >= 0 (0 = off) and mix_prob in [0, 1], got mixup={mixup}, "
                             f"cutmix={cutmix}, mix_prob={mix_prob}")
        if (mixup > 0 or cutmix > 0) and not num_classes:
            raise ValueError("mixup/cutmix make soft targets: pass num_classes")
        if with_indices and (mixup > 0 or cutmix > 0):
            raise ValueError("with_indices cannot be combined with mixup/cutmix: a mixed image is two samples, so "
                             "it has no single dataset index")
        self.with_indices = bool(with_indices)
        if not isinstance(randaugment, int) or randaugment < 0 or not 0 <= randaugment_magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"randaugment must be an int >= 0 and randaugment_magnitude in 0..{MAX_MAGNITUDE}, got "
                             f"{randaugment!r} and {randaugment_magnitude!r}")
        self.mixup, self.cutmix, self.mix_prob = float(mixup), float(cutmix), float(mix_prob)
        self.randaugment, self.randaugment_magnitude = randaugment, int(randaugment_magnitude)
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.flip = bool(flip)
        self.cutout = cutout
        self.channels_last = channels_last
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self._scale, self._shift = scale_shift(mean, std, (c, h, w), self.device, channels_last)
        self._init_sharding(n, batch_size, train, drop_last, seed, rank, world_size)

    def plan(self, epoch: int) -> EpochPlan:
        """The served indices and augmentation draws of ``epoch`` for this rank, on the CPU."""
        n, _, h, w = self.images.shape
        if not self.train:
            return EpochPlan(torch.arange(self.rank, n, self.world_size), None)
        perm = self._train_permutation(epoch)
        g_aug = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, 0xA6))
        draws = draw_augmentation(
            len(perm), h, w, padding=self.crop_padding, flip=self.flip, cutout=self.cutout, generator=g_aug
        )
        ra = mix = None
        if self.randaugment:  # own streams: turning one augmentation on leaves the others' draws unchanged
            g_ra = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, 0x5A))
            ra = draw_randaugment(len(perm), self.randaugment, g_ra)
        if self.mixup > 0 or self.cutmix > 0:
            n_batches = math.ceil(len(perm) / self.batch_size)
            mix = draw_mixing(n_batches, self.batch_size, h, w, mixup=self.mixup, cutmix=self.cutmix,
                              prob=self.mix_prob, seed=derive_seed(self.seed, epoch, self.rank, 0x3B))
        return EpochPlan(perm, draws, ra, mix)

    # ------------------------------------------------------------------------------- batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._epoch_set:
            self._epoch += 1
        self._epoch_set = False
        plan = self.plan(self._epoch)
        total = self.num_samples if not self.drop_last else self._num_batches * self.batch_size
        if not self.train:
            yield from self._iter_eval(plan.indices, total)
            return
        # one host-to-device copy of the epoch's randomness; nothing below waits for the device
        indices = plan.indices.to(self.device)
        assert plan.draws is not None
        draws = plan.draws.to(self.device)
        ra = plan.randaugment.to(self.device) if plan.randaugment is not None else None
        mix = plan.mix
        perms = mix.perm.to(self.device) if mix is not None else None
        for b, s in enumerate(range(0, total, self.batch_size)):
            e = min(s + self.batch_size, total)
            idx = indices[s:e]
            images = self._transform(self.images.index_select(0, idx), draws[s:e], ra[s:e] if ra is not None else None)
            labels = self.labels.index_select(0, idx)
            if mix is not None:
                box = tuple(int(v) for v in mix.box[b])
                images, labels = mix_batch(images, labels, self.num_classes, int(mix.mode[b]), float(mix.lam[b]),
                                           perms[b], box)
            yield (images, labels, idx) if self.with_indices else (images, labels)

    def _transform(self, x: torch.Tensor, draws: AugmentDraws | None, ra: RandAugmentDraws | None = None
                   ) -> torch.Tensor:
        return transform_batch(
            x, draws, self._scale, self._shift, crop=self.crop_padding > 0 or self.flip, padding=self.crop_padding,
            padding_mode=self.padding_mode, cutout=self.cutout, channels_last=self.channels_last, ra=ra,
            ra_magnitude=self.randaugment_magnitude,
        )

    def _iter_eval(self, indices: torch.Tensor, total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.world_size == 1:  # contiguous slices: no gather at all
            for s in range(0, total, self.batch_size):
                e = min(s + self.batch_size, total)
                yield self._transform(self.images[s:e], None), self.labels[s:e]
            return
        idx_all = indices.to(self.device)
        for s in range(0, total, self.batch_size):
            idx = idx_all[s:s + self.batch_size]
            yield self._transform(self.images.index_select(0, idx), None), self.labels.index_select(0, idx)

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"DeviceLoader({mode}, {self._size} samples, batch_size={self.batch_size}, "
                f"batches={len(self)}, device={self.device}, rank={self.rank}/{self.world_size})")
