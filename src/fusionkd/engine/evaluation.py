"""Evaluation of every head, and the choice of the best epoch (by validation accuracy, never by test).

The test split is read at the end (``eval_test=end``) or at every evaluation (``eval_test=every``), and
never when the run does not use it (``fusionkd tune``); at the end it is also evaluated with the best
epoch's weights, read back from ``best.pt``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import DeviceLoader
from ..methods import Method
from . import distributed as D
from .checkpoint import CheckpointError, load_checkpoint, load_weights_strict
from .progress import Progress


@torch.inference_mode()
def evaluate(method: Method, loader: DeviceLoader, amp, dist_info: D.DistInfo | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) of every head; counts stay on the device until the end (one sync). Under
    torchrun each rank evaluates its shard and the counts are summed, so every rank gets the same numbers.
    ``on_batch(images_done, images_total)`` is called after every batch (host-side counts, no sync)."""
    method.eval()
    correct: dict[str, torch.Tensor] = {}
    total = 0
    n_all = int(getattr(loader, "num_samples", 0))  # this rank's images (both loaders serve every one in eval)
    for images, labels in loader:
        with amp:
            heads = method.eval_logits(images)
        for name, logits in heads.items():
            hit = (logits.argmax(dim=1) == labels).sum()
            correct[name] = correct[name] + hit if name in correct else hit
        total += labels.numel()
        if on_batch is not None:
            on_batch(total, max(n_all, total))
    names = sorted(correct)
    device = next(iter(correct.values())).device if correct else torch.device("cpu")
    counts = torch.stack([correct[n] for n in names] + [torch.tensor(total, device=device)]).to(torch.float64)
    if dist_info is not None:
        D.all_reduce_sum(counts, dist_info)
    counts = counts.tolist()
    return {n: 100.0 * c / max(counts[-1], 1) for n, c in zip(names, counts[:-1])}


def update_best(best: dict[str, Any] | None, metrics: dict[str, Any], head: str) -> dict[str, Any] | None:
    """Best epoch by validation accuracy of the deploy head (never by test accuracy).

    Without a validation split the last evaluated epoch stands in (selection = "last").
    """
    if "val" not in metrics:  # not an evaluation epoch
        return best
    val = metrics.get("val") or {}
    entry = {"epoch": metrics["epoch"], "val": val, "test": metrics.get("test"),
             "selection": "val" if head in val else "last"}
    if best is None or head not in val or val[head] > (best.get("val") or {}).get(head, -math.inf):
        return entry
    return best


class Evaluation:
    """When to evaluate, on which splits, and which epoch is the best so far, for one invocation."""

    def __init__(self, val_loader: DeviceLoader | None, test_loader: DeviceLoader | None, amp,
                 dist_info: D.DistInfo, progress: Progress, run_dir: Path, *, eval_every: int, eval_test: str,
                 what: str) -> None:
        self.val_loader, self.test_loader, self.amp = val_loader, test_loader, amp
        self.dist, self.progress, self.run_dir = dist_info, progress, run_dir
        self.eval_every, self.eval_test, self.what = eval_every, eval_test, what

    def split(self, method: Method, loader: DeviceLoader, epoch: int, split: str) -> dict[str, float]:
        return evaluate(method, loader, self.amp, self.dist,
                        on_batch=lambda done, total: self.progress.eval_step(epoch, split, done, total))

    def due(self, epoch: int, final: bool) -> bool:
        return (epoch + 1) % self.eval_every == 0 or final

    def evaluate(self, method: Method, epoch: int, metrics: dict[str, Any], final: bool) -> float | None:
        """Every head on validation (and test when due) into ``metrics``; returns the deploy head's
        validation accuracy."""
        t0 = time.perf_counter()
        val = self.split(method, self.val_loader, epoch, "val") if self.val_loader is not None else {}
        metrics["val"] = val
        # the test split: at the end, or every evaluation with eval_test=every; never when use_test
        # is off (fusionkd tune); before on_validation, which may drop heads (mfkd)
        if self.test_loader is not None and (final or self.eval_test == "every"):
            metrics["test"] = self.split(method, self.test_loader, epoch, "test")
        method.on_validation(val)
        last_val = val.get(method.deploy_head)
        metrics["time_eval_s"] = time.perf_counter() - t0
        return last_val

    def select_best(self, method: Method, best: dict[str, Any] | None, metrics: dict[str, Any], epoch: int,
                    final: bool) -> dict[str, Any] | None:
        """The best epoch so far; at the end, with its test accuracy (on its own weights, from ``best.pt``)."""
        metrics["deploy_head"] = method.deploy_head
        best = update_best(best, metrics, method.deploy_head)
        if final and self.test_loader is not None and best is not None and best.get("test") is None:
            t0 = time.perf_counter()
            best = {**best, "test": self.test_best_weights(method, epoch, best)}
            metrics["time_eval_s"] = metrics.get("time_eval_s", 0.0) + time.perf_counter() - t0
        return best

    def test_best_weights(self, method: Method, epoch: int, best: dict[str, Any]) -> dict[str, float]:
        """Test accuracy of every head with the best-validation epoch's weights (from ``best.pt``); the
        method's current state is restored afterwards, bit for bit."""
        path = self.run_dir / "best.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("epoch") != best["epoch"]:
            raise CheckpointError(f"{path} holds epoch {ckpt.get('epoch')}, not the best epoch {best['epoch']}")
        current = {k: v.detach().clone() for k, v in method.state_dict().items()}
        load_weights_strict(method, ckpt["method_state"], f"this run's {self.what}")
        try:
            return self.split(method, self.test_loader, epoch, f"test (best epoch {best['epoch']})")
        finally:
            method.load_state_dict(current)
