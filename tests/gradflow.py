"""Helpers shared by the method tests: fixed batches and which parameters a loss term reaches."""

from __future__ import annotations

import torch


def batch(size: int = 28, in_chans: int = 1, n: int = 4, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch ``(n, in_chans, size, size)`` with labels in ``[0, num_classes)``."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_chans, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def reached(method: torch.nn.Module, loss: torch.Tensor) -> set[str]:
    """Names of the parameters that ``loss`` gives a non-zero gradient."""
    method.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in method.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}


def under(names: set[str], prefix: str) -> set[str]:
    """The names in ``names`` that start with ``prefix``."""
    return {n for n in names if n.startswith(prefix)}


def build_method(cls: type, model: str = "resnet20", size: int = 28, in_chans: int = 1, **options):
    """``cls`` (a Method class with an ``Options`` dataclass) on a 10-class context, seeded for repeatability."""
    from fusionkd.methods import MethodContext

    torch.manual_seed(0)
    ctx = MethodContext(model=model, num_classes=10, in_chans=in_chans, image_size=size, epochs=10)
    return cls(ctx, cls.Options(**options))
