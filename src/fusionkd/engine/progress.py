"""Progress display: a live one-line bar on a terminal, plain log lines otherwise.

The engine only refreshes it every ``log_every`` steps, which is the only host synchronisation in the
training loop.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("fusionkd")


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Shows epoch, step, loss, img/s and ETA.

    Args:
        mode: "auto" (bar when stderr is a terminal, log lines otherwise), "bar", "log" or "none".
        epochs, steps_per_epoch: the length of the run, for the ETA.
        start_epoch: the first epoch of this invocation (a resumed run's ETA counts only what is left).
    """

    def __init__(self, mode: str, epochs: int, steps_per_epoch: int, start_epoch: int = 0, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.epochs = epochs
        self.spe = max(1, steps_per_epoch)
        self.start_epoch = start_epoch
        self.t0 = time.perf_counter()
        self._width = 0

    def _eta(self, epoch: int, step: int) -> float:
        done = (epoch - self.start_epoch) * self.spe + step
        total = (self.epochs - self.start_epoch) * self.spe
        elapsed = time.perf_counter() - self.t0
        return elapsed / done * (total - done) if done > 0 else 0.0

    def step(self, epoch: int, step: int, loss: float, img_per_s: float, val_acc: float | None = None) -> None:
        """Refresh the bar; ``val_acc`` is the deploy head's latest validation accuracy (%), if any."""
        if self.mode != "bar":
            return
        frac = step / self.spe
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        acc = f" val acc {val_acc:.2f}%" if val_acc is not None else ""
        line = (f"epoch {epoch + 1}/{self.epochs} [{bar}] {step}/{self.spe} loss {loss:.4f}{acc} "
                f"{img_per_s:,.0f} img/s ETA {_fmt_time(self._eta(epoch, step))}")
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def epoch_end(self, epoch: int, text: str) -> None:
        if self.mode == "none":
            return
        if self.mode == "bar":
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            log.info(text)

    def close(self) -> None:
        if self.mode == "bar" and self._width:
            self.stream.write("\n")
            self.stream.flush()
