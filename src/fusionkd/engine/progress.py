"""Progress display: a live one-line bar on a terminal, periodic log lines otherwise, and an optional
status file that a supervising process (``fusionkd compare``) reads to show one live line per worker.

Refreshes are time-based (:meth:`Progress.due`: about once a second on a terminal, every 30 s in a log), so a
bar shows on any epoch however few steps it has, and each refresh costs the training loop one host sync (the
mean loss is read from the device); with ``progress=none`` and no status file the loop never syncs for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fusionkd")

#: seconds between refreshes of the terminal bar, of the log lines and of the status file
BAR_REFRESH_S = 1.0
LOG_REFRESH_S = 30.0
STATUS_REFRESH_S = 1.0


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Shows epoch, step, loss, the deploy head's latest validation accuracy, img/s and ETA.

    Args:
        mode: "auto" (bar when the stream is a terminal, log lines otherwise), "bar", "log" or "none".
        epochs, steps_per_epoch: the length of the run, for the ETA.
        start_epoch: the first epoch of this invocation (a resumed run's ETA counts only what is left).
        status_file: also write the latest state there as JSON (atomically), whatever the mode.
    """

    def __init__(self, mode: str, epochs: int, steps_per_epoch: int, start_epoch: int = 0, stream=None,
                 status_file: str | Path | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.epochs = epochs
        self.spe = max(1, steps_per_epoch)
        self.start_epoch = start_epoch
        self.status_file = Path(status_file) if status_file else None
        self.t0 = time.perf_counter()
        self._width = 0
        self._last_show = self.t0 if mode == "log" else -1e9  # the first log line comes after LOG_REFRESH_S
        self._last_status = -1e9
        self.state: dict[str, Any] = {"epochs": epochs, "steps": self.spe, "epoch": start_epoch + 1, "step": 0,
                                      "phase": "starting", "pid": os.getpid()}

    # ------------------------------------------------------------------ timing
    def _interval(self) -> float | None:
        return {"bar": BAR_REFRESH_S, "log": LOG_REFRESH_S}.get(self.mode)

    def due(self) -> bool:
        """Whether a refresh is due now (host-side clock only; the caller then syncs once for the loss)."""
        now = time.perf_counter()
        interval = self._interval()
        if interval is not None and now - self._last_show >= interval:
            return True
        return self.status_file is not None and now - self._last_status >= STATUS_REFRESH_S

    def eta(self, epoch: int, step: int) -> float:
        done = (epoch - self.start_epoch) * self.spe + step
        total = (self.epochs - self.start_epoch) * self.spe
        elapsed = time.perf_counter() - self.t0
        return elapsed / done * (total - done) if done > 0 else 0.0

    # ------------------------------------------------------------------ events
    def step(self, epoch: int, step: int, loss: float, img_per_s: float, val_acc: float | None = None) -> None:
        """A training refresh; ``val_acc`` is the deploy head's latest validation accuracy (%), if any."""
        eta = self.eta(epoch, step)
        self.state.update(phase="train", epoch=epoch + 1, step=step, loss=loss, img_per_s=img_per_s, val=val_acc,
                          eta_s=eta)
        acc = f" val {val_acc:.2f}%" if val_acc is not None else ""
        if self.mode == "bar":
            frac = step / self.spe
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            self._show(f"epoch {epoch + 1}/{self.epochs} [{bar}] {step}/{self.spe} loss {loss:.4f}{acc} "
                       f"{img_per_s:,.0f} img/s ETA {fmt_time(eta)}")
        elif self.mode == "log" and time.perf_counter() - self._last_show >= LOG_REFRESH_S:
            self._last_show = time.perf_counter()
            log.info("epoch %d/%d step %d/%d | loss %.4f%s | %s img/s | ETA %s", epoch + 1, self.epochs, step,
                     self.spe, loss, acc.replace(" val", " | val"), f"{img_per_s:,.0f}", fmt_time(eta))
        self._write_status()

    def eval_step(self, epoch: int, split: str, done: int, total: int) -> None:
        """An evaluation refresh (throttled here: call it every batch; it costs no host sync)."""
        if not self.due() and done < total:
            return
        self.state.update(phase=f"eval {split}", epoch=epoch + 1, eval_done=done, eval_total=total)
        if self.mode == "bar":
            self._show(f"epoch {epoch + 1}/{self.epochs} evaluating {split}: {done:,}/{total:,} images")
        self._write_status()

    def epoch_end(self, epoch: int, text: str, metrics: dict[str, Any] | None = None) -> None:
        self.state.update(phase="epoch done", epoch=epoch + 1, step=self.spe, line=text,
                          eta_s=self.eta(epoch + 1, 0))
        if metrics is not None:
            self.state["val"] = metrics.get("val_deploy", self.state.get("val"))
            self.state["loss"] = (metrics.get("train") or {}).get("loss", self.state.get("loss"))
        self._write_status(force=True)
        if self.mode == "none":
            return
        if self.mode == "bar":
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self._last_show = time.perf_counter()
            log.info(text)

    def close(self) -> None:
        if self.mode == "bar" and self._width:
            self._clear()
        if self.status_file is not None:
            with contextlib.suppress(OSError):
                self.status_file.unlink()

    # ------------------------------------------------------------------ output
    def _show(self, line: str) -> None:
        self._last_show = time.perf_counter()
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def _clear(self) -> None:
        self.stream.write("\r" + " " * self._width + "\r")
        self._width = 0
        self.stream.flush()

    def _write_status(self, force: bool = False) -> None:
        if self.status_file is None:
            return
        now = time.perf_counter()
        if not force and now - self._last_status < STATUS_REFRESH_S:
            return
        self._last_status = now
        tmp = self.status_file.with_name(self.status_file.name + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({**self.state, "time": time.time()}))
            os.replace(tmp, self.status_file)
