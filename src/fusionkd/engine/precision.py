"""Precision: the autocast context of forward passes, the fp16 grad scaler, and one optimizer step
(zero the gradients, backward, clip, step) under them."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Precision:
    """``precision`` = "fp32" | "bf16" | "fp16" on ``device``; ``grad_clip``: the gradients' largest total norm
    (0/None: no clipping). ``autocast`` is the context every forward pass runs in; fp16 adds a grad scaler,
    whose state is checkpointed (:meth:`state_dict`)."""

    def __init__(self, device: torch.device, precision: str, grad_clip: float | None = None) -> None:
        self.autocast = autocast_context(device, precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.grad_clip = grad_clip

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        """Zero the gradients, back-propagate ``loss``, clip ``params``' gradients, step the optimizer."""
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            if self.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
