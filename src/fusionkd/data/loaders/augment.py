"""Batch augmentation as whole-batch tensor ops, shared by both loaders: seeds, crop + flip, cutout,
normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..mixing import RandAugmentDraws, randaugment

PADDING_MODES = ("zero", "reflect")


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


def apply_cutout(x: torch.Tensor, centres_y: torch.Tensor, centres_x: torch.Tensor, size: int
                  ) -> torch.Tensor:
    """Zero each sample's cutout square of float ``x (B, C, H, W)`` in place (a broadcast multiply by the
    keep mask, much cheaper than ``masked_fill`` with a broadcast mask on CPU)."""
    b, _, h, w = x.shape
    in_y, in_x = _cutout_spans(centres_y, centres_x, size, h, w)
    erase = in_y.to(x.dtype).view(b, 1, h, 1) * in_x.to(x.dtype).view(b, 1, 1, w)
    return x.mul_(erase.neg_().add_(1.0))


def scale_shift(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
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
    scale, shift = scale_shift(mean, std, tuple(images.shape[1:]), images.device, channels_last)
    draws = AugmentDraws(offsets_y, offsets_x, flips, cutout_y, cutout_x)
    if cutout > 0 and (cutout_y is None or cutout_x is None):
        raise ValueError("cutout > 0 needs cutout_y and cutout_x")
    return transform_batch(images, draws, scale, shift, crop=True, padding=padding, padding_mode=padding_mode,
                      cutout=cutout, channels_last=channels_last)


def transform_batch(images: torch.Tensor, draws: AugmentDraws | None, scale: torch.Tensor, shift: torch.Tensor, *,
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
        x = apply_cutout(x, draws.cutout_y, draws.cutout_x, cutout)
    return x
