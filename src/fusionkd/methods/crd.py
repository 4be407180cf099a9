"""``crd``: Contrastive Representation Distillation from a frozen, pre-trained teacher.

Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020. The student's and the teacher's
penultimate features ``f_s, f_t`` (the pooled vectors before the classifiers) are embedded, each by its own
``Linear(dim, feat_dim)`` and an L2 normalisation, into ``v_s, v_t``. A memory bank holds one embedding per
training sample and side: ``M_s`` (the student's, RepDistiller's ``memory_v1``) and ``M_t`` (the teacher's,
``memory_v2``), ``N x feat_dim`` each. For a sample ``i`` of class ``y`` and its contrast set ``J = (i, j_1 ..
j_K)`` (itself, then ``K`` samples of other classes):

    P_s[j] = exp(<M_t[j], v_s> / tau) / Z_s,   P_t[j] = exp(<M_s[j], v_t> / tau) / Z_t      (j in J)
    NCE(P) = -[ log(P[i] / (P[i] + K/N + eps)) + sum_k log((K/N) / (P[j_k] + K/N + eps)) ]
    CRD    = mean_batch NCE(P_s) + mean_batch NCE(P_t)
    L      = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + crd_weight * CRD

(the student anchor is scored against the teacher's bank and vice versa, as in RepDistiller's
``crd/memory.py``, whose ``out_v1`` / ``out_v2`` are ``P_s`` / ``P_t``). ``Z_s = mean(exp(...)) * N`` and
``Z_t`` likewise are fixed on the first batch and kept (buffers, so a resumed run continues with them). After
the loss, the batch's rows are updated without gradient: ``M[i] = normalize(m * M[i] + (1 - m) * v)``. The
bank starts uniform in ``[-1/sqrt(feat_dim/3), 1/sqrt(feat_dim/3)]``; ``eps = 1e-7``.

What trains: the student, ``embed_s`` and ``embed_t`` (the teacher network is frozen and runs without
gradient; its embedding is trained, as in RepDistiller). The bank rows, ``Z`` and the teacher's features
are detached.

Defaults: RepDistiller's CRD row (``train_student.py --distill crd``: ``-r 1 -a 0 -b 0.8``, ``--feat_dim
128 --nce_k 16384 --nce_t 0.07 --nce_m 0.5``; mdistiller's ``CRD.py`` / ``cfg.py``: CE 1.0, FEAT 0.8, the
same NCE settings), ``T = 4`` for the optional KD term, and its 240-epoch CIFAR-100 schedule. Reference
code: RepDistiller ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``, ``Embed``), ``crd/memory.py``
(``ContrastMemory``), ``dataset/cifar100.py`` (``CIFAR100InstanceSample``, the ``exact`` mode used here).

Where fusionkd differs:

* negatives are drawn on the device, **with replacement**, uniformly among the samples of other classes
  (:func:`draw_contrast_indices`); RepDistiller draws them per sample on the CPU without replacement when
  ``K`` is at most the number of candidates. For ``N >> K`` (CIFAR-100: 49,500 candidates, 16,384 drawn)
  the two differ little, but they are not the same distribution: a row may repeat a negative here;
* the penultimate feature is the global average of the last stage map as the backbone contract offers it
  (for the pre-activation WRNs after their final BN-ReLU), i.e. the FC input of every CIFAR zoo network
  except those whose head holds weights before the pooling (MobileNetV2's 1x1 conv to 1280 channels);
* the scores are computed as ``M @ v`` over all ``N`` rows and then gathered when that takes less memory
  than the ``B x (K + 1) x feat_dim`` rows RepDistiller gathers (:func:`contrast_scores`; CIFAR-100 and
  ImageNet at their usual batch sizes); the result is the same up to float rounding;
* the contrast is computed in float32 whatever the autocast precision.

The bank takes ``2 * N * feat_dim * 4`` bytes (CIFAR-100, N = 50,000: 51 MB; ImageNet, N = 1,281,167:
1.3 GB) on the training device; it is logged, reported in the summary, and refused before training when it
does not fit the memory available there. Not available under torchrun (refused: the bank would have to be
kept identical across ranks) nor with MixUp / CutMix (refused by the engine).
Heads: ``net`` (the student). Deploy: the student.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._offline import OfflineMethod, check_classifier_trained, check_finite, check_temperature, check_weights
from .base import MethodContext, register_method
from .kd import kd_terms

log = logging.getLogger("fusionkd")

#: RepDistiller's ``eps`` in ``ContrastLoss``
NCE_EPS = 1e-7


@dataclass
class CRDOptions:
    """Options of ``crd``.

    Attributes:
        ce_weight: ``gamma``, weight of the cross-entropy with the labels.
        kd_weight: ``alpha``, weight of the optional Hinton KD term ``T^2 * KL`` (0 = off, RepDistiller's CRD).
        crd_weight: ``beta``, weight of the contrastive term.
        temperature: ``T`` of the KD term.
        feat_dim: width of the embedding space (and of the memory bank's rows).
        nce_k: ``K``, negatives per sample.
        nce_t: ``tau``, the temperature of the contrastive scores.
        nce_m: momentum of the memory bank update, in ``[0, 1)``.
        logit_std: apply logit standardization (Sun et al., CVPR 2024) to the KD term's logits.
    """

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    crd_weight: float = 0.8
    temperature: float = 4.0
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    logit_std: bool = False

    def validate(self) -> None:
        check_finite(self, "ce_weight", "kd_weight", "crd_weight", "temperature", "nce_t", "nce_m")
        check_weights(ce_weight=self.ce_weight, kd_weight=self.kd_weight, crd_weight=self.crd_weight)
        check_classifier_trained(self.ce_weight, self.kd_weight)
        check_temperature(self.temperature)
        if self.feat_dim < 1:
            raise ValueError(f"feat_dim must be an int >= 1 (the embedding width), got {self.feat_dim}")
        if self.nce_k < 1:
            raise ValueError(f"nce_k must be an int >= 1 (negatives per sample), got {self.nce_k}")
        if self.nce_t <= 0:
            raise ValueError(f"nce_t must be > 0 (the contrast temperature), got {self.nce_t}")
        if not 0 <= self.nce_m < 1:
            raise ValueError(f"nce_m must be in [0, 1) (the bank's momentum; 1 would never update it), "
                             f"got {self.nce_m}")


# ----------------------------------------------------------------------------- memory
def bank_bytes(num_samples: int, feat_dim: int) -> int:
    """Bytes of the two float32 banks: ``2 * N * feat_dim * 4``."""
    return 2 * int(num_samples) * int(feat_dim) * 4


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of ``/proc/meminfo`` on
    the CPU; ``None`` where it cannot be known."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        return None
    return None


def check_bank_fits(needed: int, available: int | None, device: torch.device | str) -> None:
    """Raise ValueError when the bank's ``needed`` bytes exceed the ``available`` bytes (``None``: unknown,
    no check)."""
    if available is not None and needed > available:
        raise ValueError(
            f"crd's memory bank needs {needed / 2**20:,.0f} MiB (2 x N x feat_dim x 4 bytes) on {device}, but only "
            f"{available / 2**20:,.0f} MiB are free there; lower options.feat_dim, train on a subset, or use a "
            "device with more memory")


# ----------------------------------------------------------------------------- pieces
def negative_tables(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, start, count)``: the dataset indices sorted by class (stable), and where each class's block
    starts in ``order`` and how long it is, ``(N,)``, ``(C,)``, ``(C,)`` int64."""
    labels = labels.long()
    order = torch.argsort(labels, stable=True)
    count = torch.bincount(labels, minlength=num_classes)
    start = torch.cumsum(count, 0) - count
    return order, start, count


def draw_contrast_indices(indices: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, start: torch.Tensor,
                          count: torch.Tensor, k: int) -> torch.Tensor:
    """Contrast indices ``(B, K + 1)``: column 0 is the sample itself (RepDistiller's ``exact`` mode), then
    ``K`` dataset indices drawn uniformly, with replacement, among the samples whose class differs from the
    sample's ``labels``. On the device, from torch's global RNG, without host synchronisation: a draw ``u`` in
    ``[0, N - n_c)`` skips class ``c``'s block of the class-sorted ``order`` (``u -> u + n_c`` when
    ``u >= start_c``)."""
    n = order.shape[0]
    c_start, c_count = start[labels], count[labels]
    others = (n - c_count).to(torch.float64)
    u = (torch.rand(labels.shape[0], k, dtype=torch.float64, device=order.device) * others[:, None]).long()
    u = torch.minimum(u, (n - c_count - 1)[:, None])  # rounding of the product must not reach the end
    u = u + c_count[:, None] * (u >= c_start[:, None])
    return torch.cat([indices.long()[:, None], order[u]], dim=1)


def contrast_scores(memory: torch.Tensor, v: torch.Tensor, contrast_idx: torch.Tensor) -> torch.Tensor:
    """``<memory[contrast_idx[b, j]], v[b]>``, ``(B, K + 1)``, the bank rows detached.

    As ``memory @ v^T`` over all ``N`` rows, then gathered, when its ``N x B`` scores plus the ``N x D`` copy
    the bank update makes take less memory than the ``B x (K + 1) x D`` rows that RepDistiller gathers for
    its ``bmm`` (CIFAR-100 at B = 64: 9.6 M floats against 134 M), else by that gather."""
    memory = memory.detach()
    n, d = memory.shape
    b, k1 = contrast_idx.shape
    if n * (d + b) < b * k1 * d:
        return (memory @ v.t()).t().gather(1, contrast_idx)
    rows = memory.index_select(0, contrast_idx.reshape(-1)).view(b, k1, d)
    return torch.bmm(rows, v[:, :, None]).squeeze(2)


def nce_loss(x: torch.Tensor, num_samples: int, eps: float = NCE_EPS) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss`` (the paper's Eq. 18) of normalised scores ``x`` ``(B, K + 1)``, the
    positive in column 0, noise ``Pn = 1 / N``: ``-(sum log(P+ / (P+ + K Pn + eps)) + sum log(K Pn / (P- +
    K Pn + eps))) / B``."""
    b, k = x.shape[0], x.shape[1] - 1
    mpn = k / float(num_samples)
    pos, neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(pos / (pos + mpn + eps))
    log_d0 = torch.log(mpn / (neg + mpn + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


class Embed(nn.Module):
    """``Linear(dim_in, dim_out)`` then L2 normalisation (RepDistiller's ``Embed``), in float32."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


class ContrastMemory(nn.Module):
    """The two banks, the fixed normalisation constants and the class tables of the negative draw.

    Buffers: ``memory_s``, ``memory_t`` ``(N, D)`` and ``z_s``, ``z_t`` (``-1`` until the first batch) are
    checkpointed; ``order``, ``start``, ``count`` (from the training labels) are not.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, feat_dim: int, nce_k: int, nce_t: float,
                 nce_m: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        n = int(labels.shape[0])
        self.num_samples, self.nce_k, self.nce_t, self.nce_m = n, int(nce_k), float(nce_t), float(nce_m)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n, feat_dim, device=device).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.full((), -1.0, device=device))
        self.register_buffer("z_t", torch.full((), -1.0, device=device))
        order, start, count = negative_tables(labels.to(device), num_classes)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("start", start, persistent=False)
        self.register_buffer("count", count, persistent=False)

    def draw(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return draw_contrast_indices(indices, labels, self.order, self.start, self.count, self.nce_k)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, contrast_idx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised scores ``(P_s, P_t)``, ``(B, K + 1)`` each; sets ``Z`` on the first call."""
        out_s = torch.exp(contrast_scores(self.memory_t, v_s, contrast_idx) / self.nce_t)
        out_t = torch.exp(contrast_scores(self.memory_s, v_t, contrast_idx) / self.nce_t)
        with torch.no_grad():  # torch.where, not `if z < 0`: no host synchronisation
            self.z_s.copy_(torch.where(self.z_s < 0, out_s.mean() * self.num_samples, self.z_s))
            self.z_t.copy_(torch.where(self.z_t < 0, out_t.mean() * self.num_samples, self.z_t))
        return out_s / self.z_s, out_t / self.z_t

    @torch.no_grad()
    def update(self, indices: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """``M[i] = normalize(m * M[i] + (1 - m) * v)`` for the batch's rows ``indices`` of both banks.

        Out of place (each bank is replaced by an updated copy, one ``N x D`` copy per step): the step's
        autograd graph still holds the old bank (``M @ v`` needs it for the gradient of ``v``), and an
        in-place write would corrupt that backward pass."""
        m = self.nce_m
        for name, v in (("memory_s", v_s), ("memory_t", v_t)):
            memory = getattr(self, name)
            rows = memory.index_select(0, indices) * m + v.detach().float() * (1 - m)
            setattr(self, name, memory.index_copy(0, indices, F.normalize(rows, dim=1)))


def pooled(stage_map: torch.Tensor) -> torch.Tensor:
    """The penultimate feature: global average of the last stage map, ``(B, C, H, W) -> (B, C)``."""
    return torch.flatten(F.adaptive_avg_pool2d(stage_map, 1), 1)


@register_method("crd", "Contrastive representation distillation from a pre-trained teacher: CE + 0.8*CRD "
                 "(NCE over a 16384-negative memory bank)")
class CRD(OfflineMethod):
    """CRD: the student's embedding is pulled to the teacher's embedding of the same image and pushed from
    those of images of other classes, drawn from a memory bank of every training sample.

    Submodules: ``net``, ``teacher``, ``embed_s``, ``embed_t``, ``bank`` (:class:`ContrastMemory`).
    """

    recipe_epochs = 240  #: RepDistiller's CIFAR-100 schedule, whose weights these defaults are
    recipe_options = ("ce_weight", "kd_weight", "crd_weight", "nce_t", "nce_m")
    needs_indices = True

    Options = CRDOptions

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        super().__init__(ctx, options)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("crd is not available under torchrun yet: its memory bank would have to be kept "
                             "identical on every rank (each rank sees other samples); train it in one process")
        labels = ctx.train_labels
        if labels is None:
            raise ValueError("crd needs the training split's labels (ctx.train_labels) to size its memory bank "
                             "and draw negatives; the engine fills them for a method with needs_indices")
        labels = torch.as_tensor(labels).long().cpu()
        n = int(labels.shape[0])
        if n < 2 or int(torch.bincount(labels, minlength=ctx.num_classes).max()) == n:
            raise ValueError(f"crd draws its negatives from other classes, but the {n} training samples are all "
                             "of one class; it needs at least two classes in the training split")
        o = self.options
        candidates = n - int(torch.bincount(labels, minlength=ctx.num_classes).max())
        if o.nce_k > candidates:
            log.warning("crd: nce_k=%d negatives per sample, but a sample of the largest class has only %d samples "
                        "of other classes: negatives repeat within each row, and the noise ratio K/N = %.2f is far "
                        "from the defaults' CIFAR-100 setting (16384 / 50000 = 0.33); consider options.nce_k=%d "
                        "(the same K/N)", o.nce_k, candidates, o.nce_k / n, max(1, round(n * 16384 / 50000)))
        device = next(self.teacher.parameters()).device
        need = bank_bytes(n, o.feat_dim)
        check_bank_fits(need, available_memory(device), device)
        s_dim = self.net.stage_info[-1].channels
        t_dim = self.teacher.stage_info[-1].channels
        self.embed_s = Embed(s_dim, o.feat_dim)
        self.embed_t = Embed(t_dim, o.feat_dim)
        self.bank = ContrastMemory(labels, ctx.num_classes, o.feat_dim, o.nce_k, o.nce_t, o.nce_m, device)
        self.bank_bytes = need
        log.info("crd: memory bank 2 x %d x %d float32 = %.1f MB on %s; %d negatives per sample", n, o.feat_dim,
                 need / 1e6, device, o.nce_k)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                      indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if indices is None:
            raise ValueError("crd needs each sample's dataset index: training_step(images, labels, epoch, "
                             "indices=...) (the engine passes them to a method with needs_indices)")
        if labels.dim() != 1:
            raise ValueError("crd needs class-id labels (B,), not soft targets: it does not train with "
                             "MixUp/CutMix")
        t_maps, t_logits = self.teacher_forward(images)
        s_maps, s_logits = self.student_forward(images)
        terms = kd_terms(s_logits, t_logits, labels, self.options)
        if self.options.crd_weight > 0:
            with torch.autocast(images.device.type, enabled=False):
                v_s = self.embed_s(pooled(s_maps[-1]).float())
                v_t = self.embed_t(pooled(t_maps[-1]).float())
                contrast_idx = self.bank.draw(indices, labels)
                p_s, p_t = self.bank(v_s, v_t, contrast_idx)
                n = self.bank.num_samples
                terms["loss_crd"] = self.options.crd_weight * (nce_loss(p_s, n) + nce_loss(p_t, n))
            self.bank.update(indices, v_s, v_t)
        return terms

    def summary_extras(self) -> dict[str, Any]:
        b = self.bank
        return {**super().summary_extras(),
                "crd": {"bank_rows": b.num_samples, "feat_dim": int(b.memory_s.shape[1]), "bank_bytes": self.bank_bytes,
                        "nce_k": b.nce_k, "z_s": float(b.z_s), "z_t": float(b.z_t)}}
