"""``tracker=tensorboard`` (or ``tensorboard=true``): TensorBoard event files in ``RUN_DIR/tb``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .base import Callback, TrackerError, deferred_stops, flat_metrics


def check(cfg: Any) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise TrackerError("tracker=tensorboard needs the tensorboard package: pip install tensorboard")


class TensorBoardTracker(Callback):
    """Every scalar of :func:`flat_metrics` per epoch (step = epoch)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        with deferred_stops():  # a stop during the write takes effect after it (whole records only)
            for k, v in flat_metrics(metrics).items():
                self.writer.add_scalar(k, v, metrics["epoch"])
            self.writer.flush()

    def on_run_end(self, summary, run_dir, error) -> None:
        with deferred_stops():
            self.writer.close()


def build(cfg: Any, run_dir: Path) -> Callback:
    check(cfg)
    return TensorBoardTracker(run_dir)
