"""MixUp, CutMix and RandAugment as whole-batch tensor ops, with every random draw made on the CPU from
generators seeded by ``(seed, epoch, rank)`` (so a resumed run reproduces its batches exactly).

**Mixed labels.** A mixed batch comes with *soft targets* ``(B, num_classes)`` float:
``lam * onehot(y) + (1 - lam) * onehot(y[perm])``. Every fusionkd method uses its labels only through
``F.cross_entropy(logits, labels)``, which accepts class-probability targets, and cross-entropy is linear in
the target, so each CE term becomes exactly ``lam * CE(z, y) + (1 - lam) * CE(z, y[perm])`` (Zhang et al.
2018; Yun et al. 2019) for every head of every method. The label-free terms (KD, attention, feature and
mutual-learning terms) are computed on the mixed images as they are: the teacher, peer or self-teacher sees
the same mixed batch as the student, so its targets are those of the mixed image.

* **MixUp** (``augment.mixup = alpha``): ``lam ~ Beta(alpha, alpha)`` per batch, ``x = lam x + (1 - lam) x[perm]``.
* **CutMix** (``augment.cutmix = alpha``): ``lam ~ Beta(alpha, alpha)``, one box of area ``(1 - lam) H W``
  (clipped at the borders) per batch pasted from ``x[perm]``; ``lam`` is then recomputed from the clipped box.
* With both on, each batch uses one of them (probability 1/2 each); ``augment.mix_prob`` is the probability
  that a batch is mixed at all.
* **RandAugment** (Cubuk et al. 2020; ``augment.randaugment = N`` ops per image at magnitude
  ``augment.randaugment_magnitude`` of 30): per image, N ops drawn uniformly from
  :data:`RANDAUGMENT_OPS`, each with a random sign for the signed ones, applied to the uint8-range images
  after crop/flip and before normalisation; the geometric ops fill with 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: the RandAugment op set (torchvision's, minus Equalize, which has no cheap whole-batch form)
RANDAUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
                   "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast")
MAX_MAGNITUDE = 30


@dataclass
class MixDraws:
    """The mixing of each batch of an epoch (CPU tensors, one row per batch).

    Attributes:
        mode: int8 ``(n_batches,)``: 0 none, 1 MixUp, 2 CutMix.
        lam: float64 ``(n_batches,)``: weight of the batch itself (after the CutMix box is clipped).
        perm: int64 ``(n_batches, batch_size)``: the partner of each position within its batch.
        box: int64 ``(n_batches, 4)``: CutMix ``y0, y1, x0, x1`` (unused for the other modes).
    """

    mode: torch.Tensor
    lam: torch.Tensor
    perm: torch.Tensor
    box: torch.Tensor


def draw_mixing(n_batches: int, batch_size: int, height: int, width: int, *, mixup: float, cutmix: float,
                prob: float, seed: int) -> MixDraws:
    """Draw the mixing of ``n_batches`` batches from a generator seeded by ``seed`` (see the module doc)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    mode = np.zeros(n_batches, np.int8)
    lam = np.ones(n_batches)
    box = np.zeros((n_batches, 4), np.int64)
    on = rng.random(n_batches) < prob
    use_cutmix = rng.random(n_batches) < 0.5 if (mixup > 0 and cutmix > 0) else np.full(n_batches, cutmix > 0)
    raw = np.empty(n_batches)
    for b in range(n_batches):
        alpha = cutmix if use_cutmix[b] else mixup
        raw[b] = rng.beta(alpha, alpha)
    centres = rng.random((n_batches, 2))
    perms = np.stack([rng.permutation(batch_size) for _ in range(n_batches)]) if n_batches else \
        np.zeros((0, batch_size), np.int64)
    for b in range(n_batches):
        if not on[b]:
            continue
        if use_cutmix[b]:
            cut = math.sqrt(1.0 - raw[b])
            ch, cw = int(round(height * cut)), int(round(width * cut))
            cy, cx = int(centres[b, 0] * height), int(centres[b, 1] * width)
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, height)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, width)
            box[b] = (y0, y1, x0, x1)
            lam[b] = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
            mode[b] = 2
        else:
            lam[b] = raw[b]
            mode[b] = 1
    return MixDraws(torch.from_numpy(mode), torch.from_numpy(lam), torch.from_numpy(perms.astype(np.int64)),
                    torch.from_numpy(box))


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mode: int, lam: float, perm: torch.Tensor,
              box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix float images ``(B, C, H, W)`` and return them with soft targets ``(B, num_classes)`` float32.

    ``mode`` 0 returns one-hot targets of the unmixed batch (so every batch of a run has the same label type).
    ``perm`` (on ``x.device``) may be longer than the batch (a last, smaller batch uses its first entries
    that fall inside it, in order).
    """
    b = x.shape[0]
    if perm.shape[0] != b:
        perm = perm[perm < b]
    target = F.one_hot(labels, num_classes).to(torch.float32)
    if mode == 0:
        return x, target
    other = target.index_select(0, perm)
    if mode == 1:
        x = x.mul(lam).add_(x.index_select(0, perm), alpha=1.0 - lam)
    else:
        y0, y1, x0, x1 = box
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.index_select(0, perm)[:, :, y0:y1, x0:x1]
    return x, target.mul_(lam).add_(other, alpha=1.0 - lam)


# ------------------------------------------------------------------------------------ RandAugment
@dataclass
class RandAugmentDraws:
    """Per image: ``ops`` int64 ``(n, N)`` op indices into :data:`RANDAUGMENT_OPS` and ``signs`` float32
    ``(n, N)`` of +-1."""

    ops: torch.Tensor
    signs: torch.Tensor

    def to(self, device) -> RandAugmentDraws:
        """``signs`` to ``device``; ``ops`` stays on the CPU (see :func:`randaugment`)."""
        return RandAugmentDraws(self.ops, self.signs.to(device))

    def __getitem__(self, s: slice) -> RandAugmentDraws:
        return RandAugmentDraws(self.ops[s], self.signs[s])


def draw_randaugment(n: int, num_ops: int, generator: torch.Generator) -> RandAugmentDraws:
    ops = torch.randint(0, len(RANDAUGMENT_OPS), (n, num_ops), generator=generator)
    signs = torch.where(torch.rand(n, num_ops, generator=generator) < 0.5, -1.0, 1.0)
    return RandAugmentDraws(ops, signs)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (b + factor * (a - b)).clamp_(0, 255)


def apply_op(name: str, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on float images ``(B, C, H, W)`` in [0, 255]; ``level`` ``(B,)`` in [-1, 1]
    (the signed magnitude / 30). Ranges follow torchvision's RandAugment."""
    B, _, H, W = x.shape
    lv = level.view(B, 1, 1, 1)
    if name == "identity":
        return x
    if name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if name == "shear_x":
            theta[:, 0, 1] = 0.3 * level
        elif name == "shear_y":
            theta[:, 1, 0] = 0.3 * level
        elif name == "translate_x":
            theta[:, 0, 2] = 2 * (150.0 / 331.0) * level  # 150/331 of the width, in [-1, 1] grid units
        elif name == "translate_y":
            theta[:, 1, 2] = 2 * (150.0 / 331.0) * level
        else:
            a = torch.deg2rad(30.0 * level)
            theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
            theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
        return _affine(x, theta)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), 1.0 + 0.9 * lv)
    if name == "color":
        return _blend(x, _grey(x).expand_as(x), 1.0 + 0.9 * lv)
    if name == "contrast":
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean.expand_as(x), 1.0 + 0.9 * lv)
    if name == "sharpness":
        k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13.0
        c = x.shape[1]
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3).repeat(c, 1, 1, 1),
                           groups=c)
        return _blend(x, blurred, 1.0 + 0.9 * lv)
    if name == "posterize":
        bits = (8 - (4 * level.abs()).round()).clamp(4, 8).view(B, 1, 1, 1)
        step = torch.pow(2.0, 8 - bits)
        return torch.floor(x / step) * step
    if name == "solarize":
        threshold = (255.0 * (1.0 - level.abs())).view(B, 1, 1, 1)
        return torch.where(x > threshold, 255.0 - x, x)  # strict: magnitude 0 leaves every pixel
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x).clamp_(0, 255)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")


def randaugment(x: torch.Tensor, draws: RandAugmentDraws, magnitude: int) -> torch.Tensor:
    """RandAugment of a batch: uint8 (or float in [0, 255]) ``(B, C, H, W)`` -> float32 in [0, 255]. Each op
    is computed once for the images that drew it (``index_select`` / ``index_copy``), never per image.
    ``draws.ops`` stays on the CPU (the indices are found there, so nothing waits for the device);
    ``draws.signs`` may be on either."""
    out = x.to(torch.float32)
    base = magnitude / MAX_MAGNITUDE
    signs = draws.signs.to(x.device)
    for layer in range(draws.ops.shape[1]):
        ops = draws.ops[:, layer].cpu()
        level = signs[:, layer] * base
        for k, name in enumerate(RANDAUGMENT_OPS):
            if name == "identity":
                continue
            idx_cpu = (ops == k).nonzero().flatten()
            if idx_cpu.numel() == 0:
                continue
            idx = idx_cpu.to(x.device)
            out = out.index_copy(0, idx, apply_op(name, out.index_select(0, idx), level.index_select(0, idx)))
    return out
