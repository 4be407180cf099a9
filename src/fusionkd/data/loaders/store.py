"""Batches from a :class:`~fusionkd.data.store.StoreSplit`: read from disk batch by batch, augmented on
whole batches on the device.

:class:`StoreLoader` keeps :class:`~fusionkd.data.DeviceLoader`'s contract (``set_epoch``, ``len``,
``num_samples``, ``plan``; the permutation from ``(seed, epoch)``, this rank's shard of it, augmentation
draws from ``(seed, epoch, rank)``), but holds no image in memory: ``workers`` reader threads fetch
the next batches of this rank's shard from the store with positioned reads (and, on the CPU, augment
them) while the current one trains, so each rank reads only its own share. Two training crops:

* ``"pad"``: the CIFAR-style crop (zero/reflect padding + random crop + flip at the stored size), the
  same :func:`~fusionkd.data.loader.crop_flip` as the in-memory loader;
* ``"random-resized"``: ImageNet-style random-resized crop (scale in ``[0.08, 1]`` of the area, aspect
  ratio in ``[3/4, 4/3]`` on a log scale, torchvision's 10 attempts then the whole image) resized to
  ``output_size`` (bilinear, antialiased, as torchvision on tensors), plus flip (:func:`resized_crop`);
  evaluation centre-crops ``output_size`` from the stored image (stored 256 px, evaluated at 224 px is the
  usual resize-256 / centre-crop-224).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..containers import CROPS, ArrayDataset, DatasetInfo
from ..mixing import draw_mixing, mix_batch
from ..store_reader import StoreSplit
from .augment import (
    PADDING_MODES,
    AugmentDraws,
    apply_cutout,
    crop_flip,
    derive_seed,
    draw_augmentation,
    normalize,
    scale_shift,
)
from .device import DeviceLoader
from .sharding import EpochSharding


@dataclass
class ResizedCropDraws:
    """Random-resized-crop boxes of ``n`` samples in an ``R x R`` image (int64 ``(n,)`` each: top, left,
    height, width), flips (bool ``(n,)``) and optional cutout centres in the output image."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flips: torch.Tensor
    cutout_y: torch.Tensor | None = None
    cutout_x: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.flips.shape[0])

    def __getitem__(self, s: slice) -> ResizedCropDraws:
        part = lambda t: None if t is None else t[s]  # noqa: E731
        return ResizedCropDraws(part(self.top), part(self.left), part(self.height), part(self.width),
                                part(self.flips), part(self.cutout_y), part(self.cutout_x))


def draw_resized_crops(n: int, size: int, *, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, cutout: int = 0,
                       output_size: int | None = None, generator: torch.Generator,
                       chunk: int = 1 << 16) -> ResizedCropDraws:
    """torchvision's ``RandomResizedCrop.get_params`` for ``n`` samples of a ``size x size`` image at once:
    10 attempts per sample (area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``,
    rounded width/height), the first that fits is used, else the whole image (the fallback of a square
    image). Positions are uniform over the valid top-left corners. Drawn ``chunk`` samples at a time (the
    attempts take ~500 bytes per sample while drawn; an ImageNet epoch would otherwise need 0.6 GB)."""
    parts = [_draw_crops_chunk(min(chunk, n - s), size, scale, ratio, flip, generator) for s in range(0, n, chunk)]
    cat = lambda i: torch.cat([p[i] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    top, left, h, w = cat(0), cat(1), cat(2), cat(3)
    flips = torch.cat([p[4] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
    if cutout > 0:
        out = output_size or size
        return ResizedCropDraws(top, left, h, w, flips, torch.randint(0, out, (n,), generator=generator),
                                torch.randint(0, out, (n,), generator=generator))
    return ResizedCropDraws(top, left, h, w, flips)


def _draw_crops_chunk(n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip: bool,
                      generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    attempts = 10
    area = float(size * size)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator,
                                                                   dtype=torch.float64))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        n, attempts, generator=generator, dtype=torch.float64)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full((n,), -1, dtype=torch.int64))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w[rows, pick], torch.full((n,), size, dtype=torch.int64))
    h = torch.where(first >= 0, h[rows, pick], torch.full((n,), size, dtype=torch.int64))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (size - h + 1)).to(torch.int64)
    left = torch.floor(u[:, 1] * (size - w + 1)).to(torch.int64)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return top, left, h, w, flips


def resized_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, flips: torch.Tensor, output_size: int) -> torch.Tensor:
    """Crop box ``(top, left, height, width)`` of each image, resize it to ``output_size`` and mirror it when
    ``flips``: torchvision's ``resized_crop`` + ``hflip`` on tensors (bilinear, ``antialias=True``, i.e.
    Pillow-like filtering when shrinking).

    One ``F.interpolate`` per image (the boxes differ in size, so they cannot share one call), then one
    batched flip. On the CPU uint8 images take PyTorch's uint8 antialiased kernel (measured 0.04-0.06 s per
    64 images 256 -> 224 on a loaded 2-core VM, against 0.28-0.42 s for one batched ``grid_sample`` and
    0.09-0.2 s for float ``interpolate``); elsewhere the crop is resized in float32 and rounded, which equals
    the uint8 result up to rounding.

    Args:
        images: uint8 ``(B, C, H, W)``.
        top, left, height, width: int64 ``(B,)`` (CPU tensors), boxes inside the image.
        flips: bool ``(B,)``.

    Returns:
        uint8 ``(B, C, S, S)``, ``S = output_size``, on ``images.device``.
    """
    b, c = images.shape[:2]
    s = output_size
    out = torch.empty((b, c, s, s), dtype=torch.uint8, device=images.device)
    on_cpu = images.device.type == "cpu"
    boxes = torch.stack([top, left, height, width], 1).tolist()
    for i, (y, x, h, w) in enumerate(boxes):
        crop = images[i:i + 1, :, y:y + h, x:x + w]
        if h == s and w == s:
            out[i:i + 1] = crop
        elif on_cpu:
            out[i:i + 1] = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        else:
            y_f = F.interpolate(crop.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out[i:i + 1] = y_f.round_().clamp_(0, 255).to(torch.uint8)
    flips = flips.to(images.device)
    if bool(flips.any()):
        out = torch.where(flips.view(b, 1, 1, 1), out.flip(-1), out)
    return out


def _ordered_map(fn, n: int, workers: int, depth: int) -> Iterator:
    """``fn(0), fn(1), ..., fn(n - 1)`` computed by ``workers`` threads, at most ``depth`` ahead of the
    consumer, yielded in order. Leaving early cancels what has not started and waits for the rest."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fusionkd-read")
    pending: deque = deque()
    try:
        for k in range(min(depth, n)):
            pending.append(pool.submit(fn, k))
        nxt = len(pending)
        while pending:
            item = pending.popleft().result()
            if nxt < n:
                pending.append(pool.submit(fn, nxt))
                nxt += 1
            yield item
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


class StoreLoader(EpochSharding):
    """Iterates over normalised (and, for training, augmented) batches of a :class:`StoreSplit`.

    Same arguments and epoch/shard semantics as :class:`~fusionkd.data.DeviceLoader`, plus:

    Args:
        crop: ``"pad"`` or ``"random-resized"`` (training); default: the split's ``crop``.
        output_size: side of the batches; default: the split's ``output_size``. ``"pad"`` needs it equal to
            the stored resolution; evaluation centre-crops it from the stored image.
        workers: reader threads; default: the split's ``workers``.
        prefetch: batches read ahead.
        scale, ratio: the random-resized crop's ranges.
        with_indices: training batches are ``(images, labels, indices)`` (the dataset indices of the batch,
            int64 ``(B,)`` on the device), as :class:`~fusionkd.data.DeviceLoader` serves them.
    """

    def __init__(
        self,
        data: StoreSplit,
        norm: DatasetInfo | tuple[Sequence[float], Sequence[float]],
        batch_size: int,
        *,
        train: bool,
        device: str | torch.device = "cpu",
        crop: str | None = None,
        output_size: int | None = None,
        crop_padding: int = 4,
        padding_mode: str = "zero",
        flip: bool = True,
        cutout: int = 0,
        drop_last: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        workers: int | None = None,
        prefetch: int = 2,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        with_indices: bool = False,
    ) -> None:
        if isinstance(norm, DatasetInfo):
            mean, std = norm.mean, norm.std
        elif isinstance(norm, (tuple, list)) and len(norm) == 2:
            mean, std = norm
        else:
            raise TypeError(f"norm must be a DatasetInfo or a (mean, std) pair, got {type(norm).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        crop = data.crop if crop is None else crop
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        res = data.resolution
        out = int(output_size or data.output_size or res)
        if out > res:
            raise ValueError(f"output_size {out} is larger than the store's {res} px images; prepare the store at "
                             f">= {out} px (store_size)")
        if crop == "pad" and train and out != res:
            raise ValueError(f"crop='pad' serves the stored {res} px images at their own size, but output_size={out}; "
                             f"use crop='random-resized' or a store prepared at {out} px")
        if padding_mode == "reflect" and crop_padding >= res:
            raise ValueError(f"reflect padding needs crop_padding < image size ({res}), got {crop_padding}")
        self.data = data
        self.device = torch.device(device)
        self.crop = crop
        self.output_size = out
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.flip = bool(flip)
        self.cutout = cutout
        self.channels_last = channels_last
        self.workers = int(workers if workers is not None else data.workers)
        self.prefetch = prefetch
        self.scale, self.ratio = scale, ratio
        self.with_indices = bool(with_indices)
        self._scale, self._shift = scale_shift(mean, std, (3, out, out), self.device, channels_last)
        self._init_sharding(len(data), batch_size, train, drop_last, seed, rank, world_size)

    def plan(self, epoch: int) -> tuple[torch.Tensor, AugmentDraws | ResizedCropDraws | None]:
        """``(indices, draws)`` of ``epoch`` for this rank: the same permutation and sharding as
        :meth:`DeviceLoader.plan`; draws are :class:`AugmentDraws` (``"pad"``) or
        :class:`ResizedCropDraws` (``"random-resized"``), None in evaluation."""
        if not self.train:
            return torch.arange(self.rank, self._size, self.world_size), None
        perm = self._train_permutation(epoch)
        g_aug = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, 0xA6))
        res = self.data.resolution
        if self.crop == "pad":
            draws = draw_augmentation(len(perm), res, res, padding=self.crop_padding, flip=self.flip,
                                      cutout=self.cutout, generator=g_aug)
        else:
            draws = draw_resized_crops(len(perm), res, scale=self.scale, ratio=self.ratio, flip=self.flip,
                                       cutout=self.cutout, output_size=self.output_size, generator=g_aug)
        return perm, draws

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._epoch_set:
            self._epoch += 1
        self._epoch_set = False
        indices, draws = self.plan(self._epoch)
        total = self.num_samples if not self.drop_last else self._num_batches * self.batch_size
        idx_np = indices.numpy()
        spans = [(s, min(s + self.batch_size, total)) for s in range(0, total, self.batch_size)]
        labels = self.data.labels
        on_cpu = self.device.type == "cpu"

        def batch(k: int):
            # reader thread: read the batch; on the CPU also transform it there (torch ops release the GIL,
            # so `workers` batches are made in parallel while the training step runs)
            s, e = spans[k]
            raw = torch.from_numpy(self.data.read(idx_np[s:e]))
            part = None if draws is None else draws[s:e]
            return (self._transform(raw, part) if on_cpu else raw), labels[indices[s:e]], part, indices[s:e]

        depth = max(self.prefetch, self.workers)
        for x, y, part, idx in _ordered_map(batch, len(spans), self.workers, depth):
            if not on_cpu:
                x = x.pin_memory() if self.device.type == "cuda" else x
                x = self._transform(x.to(self.device, non_blocking=True), part)
                y = y.to(self.device, non_blocking=True)
            if self.with_indices and self.train:
                yield x, y, idx.to(self.device, non_blocking=True)
            else:
                yield x, y

    def _transform(self, x: torch.Tensor, draws: AugmentDraws | ResizedCropDraws | None) -> torch.Tensor:
        res, out = self.data.resolution, self.output_size
        if draws is None:  # evaluation: centre crop
            if out != res:
                o = (res - out) // 2
                x = x[:, :, o:o + out, o:o + out]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return normalize(x, self._scale, self._shift)
        if isinstance(draws, AugmentDraws):
            d = draws.to(self.device)
            if self.crop_padding > 0 or self.flip:
                x = crop_flip(x, d.offsets_y, d.offsets_x, d.flips, padding=self.crop_padding,
                              padding_mode=self.padding_mode, channels_last=self.channels_last)
            elif self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = normalize(x, self._scale, self._shift)
        else:
            d = draws
            x = resized_crop(x, d.top, d.left, d.height, d.width, d.flips, out)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = normalize(x, self._scale, self._shift)
        if self.cutout > 0 and d.cutout_y is not None:
            x = apply_cutout(x, d.cutout_y.to(self.device), d.cutout_x.to(self.device), self.cutout)
        return x

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"StoreLoader({mode}, {self._size} samples, {self.data.resolution}->{self.output_size} px, "
                f"crop={self.crop}, batch_size={self.batch_size}, batches={len(self)}, rank={self.rank}/"
                f"{self.world_size}, workers={self.workers})")


class MixingStoreLoader:
    """A training :class:`StoreLoader` whose batches are mixed (MixUp / CutMix) as :class:`DeviceLoader` mixes
    them: the same draws (:func:`~fusionkd.data.mixing.draw_mixing`, seeded by (seed, epoch, rank)), the same
    soft targets, so exact resume holds on the store too."""

    def __init__(self, inner: StoreLoader, *, mixup: float, cutmix: float, mix_prob: float, num_classes: int):
        if mixup < 0 or cutmix < 0 or not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mixup and cutmix must be >= 0 (0 = off) and mix_prob in [0, 1], got mixup={mixup}, "
                             f"cutmix={cutmix}, mix_prob={mix_prob}")
        if not num_classes:
            raise ValueError("mixup/cutmix make soft targets: pass num_classes")
        self.inner = inner
        self.mixup, self.cutmix, self.mix_prob, self.num_classes = mixup, cutmix, mix_prob, num_classes
        self._epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:

        if self._epoch is None:
            raise RuntimeError("call set_epoch(epoch) before iterating a mixing store loader")
        size = self.inner.output_size
        mix = draw_mixing(len(self.inner), self.inner.batch_size, size, size, mixup=self.mixup, cutmix=self.cutmix,
                          prob=self.mix_prob, seed=derive_seed(self.inner.seed, self._epoch, self.inner.rank, 0x3B))
        perms = mix.perm.to(self.inner.device)
        for b, (images, labels) in enumerate(self.inner):
            box = tuple(int(v) for v in mix.box[b])
            yield mix_batch(images, labels, self.num_classes, int(mix.mode[b]), float(mix.lam[b]), perms[b], box)


def make_loader(data: ArrayDataset | StoreSplit, norm, batch_size: int, **kwargs
                ) -> DeviceLoader | StoreLoader | MixingStoreLoader:
    """The loader for ``data``: :class:`DeviceLoader` for an in-memory split, :class:`StoreLoader` for a
    store split (same keyword arguments; ``StoreLoader``-only ones are ignored for in-memory data).

    On a store, MixUp/CutMix wrap the loader (:class:`MixingStoreLoader`); RandAugment is not available there
    yet (its ops run on uint8 images before normalisation, inside :class:`DeviceLoader`) and is refused."""
    if isinstance(data, StoreSplit):
        mixup, cutmix = float(kwargs.pop("mixup", 0.0)), float(kwargs.pop("cutmix", 0.0))
        mix_prob = float(kwargs.pop("mix_prob", 1.0))
        num_classes = kwargs.pop("num_classes", None)
        ra, _ = int(kwargs.pop("randaugment", 0)), kwargs.pop("randaugment_magnitude", None)
        if ra:
            raise ValueError("augment.randaugment is not available for data read from a store (imagenet, cub200, "
                             "tinyimagenet, or storage=store); use it with in-memory data (storage=memory)")
        if (mixup > 0 or cutmix > 0) and kwargs.get("with_indices"):
            raise ValueError("with_indices cannot be combined with mixup/cutmix: a mixed image is two samples, so "
                             "it has no single dataset index")
        loader = StoreLoader(data, norm, batch_size, **kwargs)
        if (mixup > 0 or cutmix > 0) and loader.train:
            return MixingStoreLoader(loader, mixup=mixup, cutmix=cutmix, mix_prob=mix_prob,
                                     num_classes=int(num_classes or 0))
        return loader
    for key in ("crop", "output_size", "workers", "prefetch", "scale", "ratio"):
        kwargs.pop(key, None)
    return DeviceLoader(data, norm, batch_size, **kwargs)
