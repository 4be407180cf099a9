"""Data-parallel training under ``torchrun``: process group, DDP wrapping, reductions.

``torchrun --nproc-per-node N -m fusionkd train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU). Without
those variables everything here is a no-op and training runs in one process.

How methods are wrapped: the whole :class:`~fusionkd.methods.Method` (every network, fusion module,
self-teacher and branch) goes into ONE ``DistributedDataParallel`` wrapper whose ``forward`` is the
method's ``training_step``. Parameters that do not require gradients (a frozen teacher, a fusion module
after its own stage) are ignored by DDP, so a frozen teacher is simply replicated on every rank. When a
method changes which parameters train (e.g. MFKD freezing its fusion module), the engine re-wraps at the
next epoch start, so ``find_unused_parameters`` (and its slowness) is never needed.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("fusionkd")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by torchrun (single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns this rank's info and device.

    On CUDA each process uses ``cuda:LOCAL_RANK`` (``device=auto`` or ``cuda``); on CPU all use the CPU.
    """
    from .config import resolve_device

    info = env_info()
    device = resolve_device(device_name)
    if not info.enabled:
        return info, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        log.debug("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (e.g. an error message from rank 0)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def trainable_signature(module: nn.Module) -> tuple[int, ...]:
    """Identity of the set of parameters that currently require gradients."""
    return tuple(id(p) for p in module.parameters() if p.requires_grad)


def wrap(method: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """One DDP wrapper around the whole method (its ``forward`` is ``training_step``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True,
               find_unused_parameters=False)


def convert_sync_batchnorm(method: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by SyncBatchNorm (statistics over the global batch; CUDA only in PyTorch)."""
    from .config import ConfigError

    if device.type != "cuda":
        raise ConfigError("sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU/gloo kernel); "
                          "on CPU every rank normalises with its own batch statistics")
    return nn.SyncBatchNorm.convert_sync_batchnorm(method)


def cleanup(info: DistInfo) -> None:
    """Tear the process group down while the interpreter is fully alive.

    Call it after the last reference to any DDP wrapper is gone: a wrapper's reducer keeps the group
    alive, and a gloo group left to interpreter shutdown can abort the process ("terminate called without
    an active exception", exit -6) after all the work is done. ``gc.collect`` frees wrappers caught in
    reference cycles, so nothing but the default group is left to destroy.
    """
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
