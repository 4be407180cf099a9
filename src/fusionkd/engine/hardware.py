"""What a run ran on (recorded in every summary), and the seeding of every random generator."""

from __future__ import annotations

import contextlib
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..version import __version__


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support(flags: set[str] | None = None) -> str:
    """What the CPU offers bf16 matmuls/convolutions: "amx" (AMX-BF16 tiles), "avx512_bf16" (AVX-512-BF16
    dot products) or "none" (bf16 is then emulated). Recorded with every run; whether bf16 is *faster* also
    depends on oneDNN's kernels for the shapes at hand, so ``fusionkd demo --precision auto`` measures it."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "none"


def hardware_info(device: torch.device) -> dict[str, Any]:
    flags = cpu_flags()
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device),
            "torch": str(torch.__version__), "python": platform.python_version(), "fusionkd": __version__,
            "cpu_bf16": cpu_bf16_support(flags)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
