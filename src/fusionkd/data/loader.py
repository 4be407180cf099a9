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

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import ArrayDataset, DatasetInfo
from .mixing import MAX_MAGNITUDE, MixDraws, RandAugmentDraws, draw_mixing, draw_randaugment, mix_batch, randaugment

logger = logging.getLogger(__name__)

PADDING_MODES = ("zero", "reflect")

__all__ = [
    "AugmentDraws",
    "DeviceLoader",
    "EpochPlan",
    "PADDING_MODES",
    "augment_batch",
    "crop_flip",
    "cutout_mask",
    "derive_seed",
    "draw_augmentation",
    "normalize",
]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing the integers ``keys`` (numpy ``SeedSequence``), for ``torch.Generator``.

    Distinct key tuples give statistically independent streams (unlike ``seed + epoch``, where
    ``(seed=1, epoch=0)`` and ``(seed=0, epoch=1)`` would collide).
    """
    entropy = [int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


# ----------------------------------------------------------------------------------- augmentation


@dataclass
class AugmentDraws:
    """Random augmentation parameters of ``n`` samples.

    Attributes:
        offsets_y, offsets_x: int64 ``(n,)`` in ``[0, 2 * padding]``: top-left corner of the crop in the
            padded image (``padding`` = unshifted).
        flips: bool ``(n,)``: mirror horizontally (after cropping).
        cutout_y, cutout_x: int64 ``(n,)`` cutout square centres in ``[0, H)`` x ``[0, W)``, or None.
    """

    offsets_y: torch.Tensor
    offsets_x: torch.Tensor
    flips: torch.Tensor
    cutout_y: torch.Tensor | None = None
    cutout_x: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.flips.shape[0])

    def to(self, device: torch.device | str) -> AugmentDraws:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AugmentDraws(move(self.offsets_y), move(self.offsets_x), move(self.flips),
                            move(self.cutout_y), move(self.cutout_x))

    def __getitem__(self, s: slice) -> AugmentDraws:
        part = lambda t: None if t is None else t[s]  # noqa: E731
        return AugmentDraws(part(self.offsets_y), part(self.offsets_x), part(self.flips),
                            part(self.cutout_y), part(self.cutout_x))


def draw_augmentation(n: int, height: int, width: int, *, padding: int, flip: bool, cutout: int,
                      generator: torch.Generator) -> AugmentDraws:
    """Draw the augmentation of ``n`` samples from ``generator`` (a CPU generator), uniformly: crop offsets
    in ``[0, 2 * padding]``, flips with probability 1/2 (never when ``flip`` is False), cutout centres
    anywhere in the image (none when ``cutout == 0``). Returns CPU tensors."""
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    if cutout > 0:
        cy = torch.randint(0, height, (n,), generator=generator)
        cx = torch.randint(0, width, (n,), generator=generator)
        return AugmentDraws(oy, ox, flips, cy, cx)
    return AugmentDraws(oy, ox, flips)


def crop_flip(images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, flips: torch.Tensor,
              *, padding: int, padding_mode: str = "zero", channels_last: bool = False) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a whole batch, in one gather.

    Equivalent, sample by sample, to: pad the image by ``padding`` pixels on every side (zeros, or a
    mirror image without repeating the edge for ``"reflect"``, as ``numpy.pad(mode="reflect")``), take the
    ``H x W`` window whose top-left corner is ``(offsets_y[b], offsets_x[b])`` in the padded image, and
    mirror it left-right when ``flips[b]``. Each output pixel's source pixel is computed from the draws
    ((B, H) row and (B, W) column indices, combined into one (B, H*W) index shared by the channels) and
    fetched by a single ``gather`` from the unpadded batch: reflect padding maps out-of-range coordinates
    back into the image, zero padding clamps them and multiplies the padding pixels by 0 afterwards (2.5x
    faster on CPU than gathering from an ``F.pad``-ed copy).

    Args:
        images: ``(B, C, H, W)``, any dtype (uint8 in the loader).
        offsets_y, offsets_x: int64 ``(B,)`` in ``[0, 2 * padding]``, on ``images.device``.
        flips: bool ``(B,)``.
        padding: pixels of padding; ``"reflect"`` needs ``padding < min(H, W)``.
        padding_mode: ``"zero"`` or ``"reflect"``.
        channels_last: write the result in ``torch.channels_last`` memory format (directly, no extra copy).

    Returns:
        ``(B, C, H, W)`` tensor of ``images.dtype``.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    b, c, h, w = images.shape
    dev = images.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    # source coordinates in the unpadded image of every output row (B, H) and column (B, W)
    rows = (offsets_y - padding).view(b, 1) + ar_h
    cols = (offsets_x - padding).view(b, 1) + torch.where(flips.view(b, 1), (w - 1) - ar_w, ar_w)
    keep = None
    if padding > 0 and padding_mode == "reflect":  # mirror out-of-range coordinates: -1 -> 1, H -> H - 2
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
    elif padding > 0:  # zero padding: fetch any in-range pixel, then multiply padding pixels by 0
        keep_rows = ((rows >= 0) & (rows < h)).to(images.dtype).view(b, 1, h, 1)
        keep_cols = ((cols >= 0) & (cols < w)).to(images.dtype).view(b, 1, 1, w)
        keep = keep_rows * keep_cols  # (B, 1, H, W)
        rows = rows.clamp(0, h - 1)
        cols = cols.clamp(0, w - 1)
    index = (rows.view(b, h, 1) * w + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    src = images.reshape(b, c, h * w)
    if channels_last:
        out = torch.empty((b, h, w, c), dtype=images.dtype, device=dev).permute(0, 3, 1, 2)
        torch.gather(src, 2, index, out=out.reshape(b, c, h * w))  # a view with strides (hwc, 1, c)
    else:
        out = src.gather(2, index).view(b, c, h, w)
    return out.mul_(keep) if keep is not None else out


def cutout_mask(centres_y: torch.Tensor, centres_x: torch.Tensor, size: int, height: int, width: int
                ) -> torch.Tensor:
    """bool ``(B, 1, H, W)``: True inside each sample's ``size x size`` cutout square.

    The square spans rows ``[cy - size // 2, cy - size // 2 + size)`` and the same for columns, clipped to
    the image (so it is smaller near the borders), as in DeVries & Taylor (2017).
    """
    in_y, in_x = _cutout_spans(centres_y, centres_x, size, height, width)
    b = centres_y.shape[0]
    return in_y.view(b, 1, height, 1) & in_x.view(b, 1, 1, width)


def _cutout_spans(centres_y: torch.Tensor, centres_x: torch.Tensor, size: int, height: int, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(B, H)`` rows and ``(B, W)`` columns inside each cutout square."""
    dev = centres_y.device
    y0 = (centres_y - size // 2).view(-1, 1)
    x0 = (centres_x - size // 2).view(-1, 1)
    ar_h = torch.arange(height, device=dev)
    ar_w = torch.arange(width, device=dev)
    return (ar_h >= y0) & (ar_h < y0 + size), (ar_w >= x0) & (ar_w < x0 + size)


def _apply_cutout(x: torch.Tensor, centres_y: torch.Tensor, centres_x: torch.Tensor, size: int
                  ) -> torch.Tensor:
    """Zero each sample's cutout square of float ``x (B, C, H, W)`` in place (a broadcast multiply by the
    keep mask, much cheaper than ``masked_fill`` with a broadcast mask on CPU)."""
    b, _, h, w = x.shape
    in_y, in_x = _cutout_spans(centres_y, centres_x, size, h, w)
    erase = in_y.to(x.dtype).view(b, 1, h, 1) * in_x.to(x.dtype).view(b, 1, 1, w)
    return x.mul_(erase.neg_().add_(1.0))


def _scale_shift(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                 shape: tuple[int, int, int], device: torch.device, channels_last: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = 1 / (255 std)`` and ``shift = -mean / std`` as float32 ``(1, C, H, W)`` tensors in the
    batches' memory format: a same-layout operand keeps the normalisation vectorised, where broadcasting a
    ``(1, C, 1, 1)`` tensor over channels-last batches is 4x slower on CPU."""
    channels, h, w = shape
    mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {mean_t.numel()} "
                         f"and {std_t.numel()}")
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    full = lambda t: t.to(torch.float32).view(1, channels, 1, 1).expand(1, channels, h, w)  # noqa: E731
    scale = full(1.0 / (255.0 * std_t)).contiguous(memory_format=fmt).to(device)
    shift = full(-mean_t / std_t).contiguous(memory_format=fmt).to(device)
    return scale, shift


def normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``x * scale + shift`` (``scale = 1 / (255 std)``,
    ``shift = -mean / std``, broadcastable to ``(1, C, H, W)``), i.e. ``(x / 255 - mean) / std``; keeps the
    memory format of ``images``. (Two in-place passes beat ``torch.addcmul`` by 2x on CPU.)"""
    return images.to(torch.float32).mul_(scale).add_(shift)


def augment_batch(
    images: torch.Tensor,
    offsets_y: torch.Tensor,
    offsets_x: torch.Tensor,
    flips: torch.Tensor,
    *,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    padding: int = 4,
    padding_mode: str = "zero",
    cutout: int = 0,
    cutout_y: torch.Tensor | None = None,
    cutout_x: torch.Tensor | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """The loader's training transform of one batch, given its random draws (a convenience wrapper; the
    loader precomputes ``scale``/``shift`` once instead of per batch).

    Steps: :func:`crop_flip` on the uint8 images; normalise to ``(x / 255 - mean) / std``; then, when
    ``cutout > 0``, set each sample's cutout square (:func:`cutout_mask`) to 0, i.e. to the mean colour, as
    the original cutout does on normalised images.

    Args:
        images: uint8 ``(B, C, H, W)``.
        offsets_y, offsets_x, flips, cutout_y, cutout_x: see :class:`AugmentDraws` (``(B,)`` each).
        mean, std: ``C`` values each, for pixels in ``[0, 1]``.

    Returns:
        float32 ``(B, C, H, W)`` (channels-last memory format when ``channels_last``).
    """
    scale, shift = _scale_shift(mean, std, tuple(images.shape[1:]), images.device, channels_last)
    draws = AugmentDraws(offsets_y, offsets_x, flips, cutout_y, cutout_x)
    if cutout > 0 and (cutout_y is None or cutout_x is None):
        raise ValueError("cutout > 0 needs cutout_y and cutout_x")
    return _transform(images, draws, scale, shift, crop=True, padding=padding, padding_mode=padding_mode,
                      cutout=cutout, channels_last=channels_last)


def _transform(images: torch.Tensor, draws: AugmentDraws | None, scale: torch.Tensor, shift: torch.Tensor, *,
               crop: bool, padding: int, padding_mode: str, cutout: int, channels_last: bool,
               ra: RandAugmentDraws | None = None, ra_magnitude: int = 0) -> torch.Tensor:
    """crop/flip (uint8, when ``crop``) -> memory format -> RandAugment (when ``ra``) -> normalise (float32)
    -> cutout; no augmentation when ``draws`` is None. Shared by :func:`augment_batch` and
    :class:`DeviceLoader`."""
    x = images
    if draws is not None and crop:
        x = crop_flip(x, draws.offsets_y, draws.offsets_x, draws.flips, padding=padding,
                      padding_mode=padding_mode, channels_last=channels_last)
    elif channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if ra is not None:
        x = randaugment(x, ra, ra_magnitude)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    x = normalize(x, scale, shift)
    if draws is not None and cutout > 0:
        assert draws.cutout_y is not None and draws.cutout_x is not None
        x = _apply_cutout(x, draws.cutout_y, draws.cutout_x, cutout)
    return x


# ----------------------------------------------------------------------------------------- loader


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
        self._scale, self._shift = _scale_shift(mean, std, (c, h, w), self.device, channels_last)
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
            yield images, labels

    def _transform(self, x: torch.Tensor, draws: AugmentDraws | None, ra: RandAugmentDraws | None = None
                   ) -> torch.Tensor:
        return _transform(
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
