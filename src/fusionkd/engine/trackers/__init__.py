"""Experiment tracking: the :class:`Callback` interface the training loop calls, and the built-in trackers.

The loop never imports a tracker by name: :func:`build_trackers` turns ``tracker=`` into callbacks (only on
rank 0), and anyone can hand their own :class:`Callback` objects to ``Trainer.callbacks``. Built in:
``tensorboard`` (:mod:`.tensorboard`) and ``mlflow`` (:mod:`.mlflow`). See docs/engine.md.
"""

from __future__ import annotations

from .base import (
    TRACKERS,
    Callback,
    TrackerError,
    build_trackers,
    check_tracker,
    defer_stop,
    deferred_stops,
    flat_metrics,
)

__all__ = ["TRACKERS", "Callback", "TrackerError", "build_trackers", "check_tracker", "defer_stop", "deferred_stops",
           "flat_metrics"]
