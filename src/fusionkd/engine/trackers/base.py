"""The callback interface of the training loop (Lightning's loggers / Optuna's callbacks, reduced to the
four moments a tracker or a tuner needs) and the tracker registry."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...errors import TrackerError


class Callback:
    """Hooks the :class:`~fusionkd.engine.trainer.Trainer` calls on rank 0, in this order:

    * :meth:`on_run_start` once, after the data and the method are built and before the first step (a
      resumed run calls it again with ``start_epoch > 0``);
    * :meth:`on_epoch_end` after every epoch, once its line is in ``metrics.jsonl`` and ``last.pt`` is
      written (``metrics``: the ``metrics.jsonl`` record: ``epoch``, ``lr``, ``train`` loss terms,
      ``val``/``test`` per head on evaluated epochs, ``deploy_head``, ``img_per_s``...). An exception raised
      here stops the run (this is how the tuner prunes a trial); the epoch stays resumable;
    * :meth:`on_run_end` with the ``summary.json`` content and the run folder (for artifacts) when the run
      finished, or ``summary=None`` with the exception when it stopped early (``--stop-after``: error None).
    """

    def on_run_start(self, config: dict[str, Any], run_dir: Path, start_epoch: int) -> None:
        """``config``: the fully resolved config as a dict."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """Called once per epoch with that epoch's ``metrics.jsonl`` record."""

    def on_run_end(self, summary: dict[str, Any] | None, run_dir: Path, error: BaseException | None) -> None:
        """``summary`` is None when the run stopped before its last epoch."""


_shield = threading.local()


@contextlib.contextmanager
def deferred_stops() -> Iterator[None]:
    """Let a tracker's store I/O run to its end: a stop (Ctrl-C, ``SIGTERM``, ``SIGHUP``) whose handler calls
    :func:`defer_stop` (``fusionkd.cli``'s do) while the block runs is raised when the block ends, not in the
    middle of a database transaction, which would leave the store locked and the tracked run ``RUNNING``."""
    _shield.depth = getattr(_shield, "depth", 0) + 1
    try:
        yield
    finally:
        _shield.depth -= 1
        pending = getattr(_shield, "pending", None)
        if _shield.depth == 0 and pending is not None:
            _shield.pending = None
            raise pending


def defer_stop(stop: BaseException) -> bool:
    """Called by a signal handler (in the main thread) with the exception it would raise: inside
    :func:`deferred_stops`, keep it to be raised at the block's end and return True; else return False (the
    handler raises it now)."""
    if getattr(_shield, "depth", 0) > 0:
        if getattr(_shield, "pending", None) is None:
            _shield.pending = stop
        return True
    return False


def flat_metrics(m: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as flat scalar names: ``train/loss``, ``train/loss_ce``, ``val/net``,
    ``test/net``, ``lr``, ``img_per_s``, ``time_train_s``, ``time_eval_s``."""
    out: dict[str, float] = {f"train/{k}": float(v) for k, v in (m.get("train") or {}).items()}
    for split in ("val", "test"):
        for head, acc in (m.get(split) or {}).items():
            out[f"{split}/{head}"] = float(acc)
    for key in ("lr", "img_per_s", "time_train_s", "time_eval_s"):
        if isinstance(m.get(key), (int, float)):
            out[key] = float(m[key])
    return out


#: ``tracker=NAME`` -> (module with a ``build(cfg, run_dir) -> Callback`` and a ``check(cfg)``, package hint)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("fusionkd.engine.trackers.tensorboard", "pip install tensorboard"),
    "mlflow": ("fusionkd.engine.trackers.mlflow", "pip install 'fusionkd[mlflow]'"),
}


def _module(name: str):
    if name not in TRACKERS:
        raise TrackerError(f"tracker={name!r} is not a tracker; accepted: none, {', '.join(TRACKERS)}")
    return importlib.import_module(TRACKERS[name][0])


def tracker_names(cfg: Any) -> list[str]:
    """The trackers a config asks for: ``tracker`` (comma-separated) plus the older ``tensorboard=true``."""
    names = [] if cfg.tracker in ("none", "") else [n.strip() for n in cfg.tracker.split(",") if n.strip()]
    if getattr(cfg, "tensorboard", False) and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_tracker(cfg: Any) -> None:
    """Config-time check (no side effects): known names, packages importable, a usable ``tracker_uri``."""
    names = tracker_names(cfg)
    if cfg.tracker_uri is not None and "mlflow" not in names:
        raise TrackerError(f"tracker_uri={cfg.tracker_uri!r} is only used by tracker=mlflow (tracker={cfg.tracker!r})")
    for n in names:
        _module(n).check(cfg)


def build_trackers(cfg: Any, run_dir: Path) -> list[Callback]:
    """The callbacks of ``cfg``'s trackers, each started (an unusable one raises :class:`TrackerError`)."""
    out: list[Callback] = []
    for n in tracker_names(cfg):
        try:
            out.append(_module(n).build(cfg, run_dir))
        except TrackerError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to start is the same refusal, named
            raise TrackerError(f"tracker {n} could not start: {type(e).__name__}: {e}") from e
    return out


BuildFn = Callable[[Any, Path], Callback]
