"""Optimizers and learning-rate schedules (stepped every iteration, defined in epochs)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import Config


def build_optimizer(param_groups: list[dict[str, Any]], cfg: Config, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over the method's parameter groups.

    Groups keep their own ``weight_decay`` (e.g. FFL's fusion module uses 1e-5); ``name`` entries are
    kept for logging.
    """
    groups = [dict(g) for g in param_groups if len(list(g["params"])) > 0]
    for g in groups:
        g["params"] = list(g["params"])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def default_milestones(epochs: int) -> list[int]:
    """50 % and 75 % of the run: the 150/225-of-300 and 100/150-of-200 recipes scaled to ``epochs``."""
    ms = sorted({max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))})
    return [m for m in ms if m < epochs]


def lr_factor(epoch: float, cfg: Config, step_fraction: float = 0.0) -> float:
    """Multiplier of the base lr at (fractional) ``epoch``: linear warm-up, then the schedule.

    During warm-up the factor is ``(epoch + step_fraction) / warmup_epochs`` where ``step_fraction``
    is one step in epochs, so the first step already has a non-zero learning rate.
    """
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return min(1.0, (epoch + step_fraction) / cfg.warmup_epochs)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
        t = min(max(epoch - cfg.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    milestones = cfg.milestones if cfg.milestones is not None else default_milestones(cfg.epochs)
    return cfg.gamma ** sum(1 for m in milestones if epoch >= m)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """A ``LambdaLR`` stepped once per iteration; ``state_dict`` is its step count (exact resume)."""
    spe = max(1, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step / spe, cfg, 1.0 / spe))
