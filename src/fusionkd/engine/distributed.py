"""Data-parallel training under ``torchrun``: process group, DDP wrapping, reductions.

``torchrun --nproc-per-node N -m fusionkd train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU). It does so for
``N = 1`` too: a process that torchrun launched trains in a group of one, through DDP and the backend's
collectives, as each of N would (a check of a multi-GPU set-up on one GPU). Without those variables
everything here is a no-op and training runs in one process.

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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("fusionkd")


#: what torchrun sets in every process it launches (with these, a process forms a group even alone)
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node; ``launched``: started
    by torchrun, so it trains in a process group even when ``world_size`` is 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def enabled(self) -> bool:
        """Whether this process trains in a process group (DDP, collectives): under torchrun, any world size."""
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by torchrun (single process without them).

    A process counts as launched by torchrun when all of :data:`LAUNCHER_VARIABLES` are set, or
    ``TORCHELASTIC_RUN_ID`` is; such a process forms a group even with ``WORLD_SIZE=1``. ``WORLD_SIZE=1``
    alone (no launcher) is one plain process, as before."""
    from .config import ConfigError

    env = os.environ
    launched = all(k in env for k in LAUNCHER_VARIABLES) or "TORCHELASTIC_RUN_ID" in env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 and not launched:
        return DistInfo()
    if "RANK" not in env:
        raise ConfigError(f"WORLD_SIZE={world} is set but RANK is not: launch distributed training with torchrun "
                          "(it sets both), or unset WORLD_SIZE for one process")
    rank = int(env["RANK"])
    return DistInfo(rank, world, int(env.get("LOCAL_RANK", rank)), launched=launched)


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


def group_record(info: DistInfo) -> dict[str, Any] | None:
    """``{"world_size", "backend"}`` of the process group this process trains in (read from the live group, so
    it names the backend actually used: ``nccl``, ``gloo``), or None for one plain process. Recorded in
    ``summary.json`` (``hardware.distributed``)."""
    if not info.enabled:
        return None
    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None
    return {"world_size": info.world_size, "backend": backend}
