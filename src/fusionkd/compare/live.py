"""One live line per worker of ``fusionkd compare`` / ``fusionkd demo`` (``--workers > 1``).

Each worker's trainer writes its progress state as JSON to ``OUT/logs/<run>.status.json`` about once a
second (:class:`fusionkd.engine.progress.Progress`); the supervising process reads those files. On a terminal
the lines are redrawn in place under the comparison's own messages; otherwise (a log file, CI) one line per
worker is written every ``log_interval`` seconds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..engine.progress import fmt_time


def status_text(state: dict[str, Any] | None) -> str:
    """One worker's state as a short line: epoch, step or evaluation, loss, last val accuracy, ETA."""
    if not state:
        return "starting ..."
    epoch, epochs = state.get("epoch"), state.get("epochs")
    parts = [f"epoch {epoch}/{epochs}"]
    phase = str(state.get("phase", ""))
    if phase.startswith("eval"):
        parts.append(f"evaluating {phase[5:]} {state.get('eval_done', 0):,}/{state.get('eval_total', 0):,}")
    elif phase == "train":
        parts.append(f"step {state.get('step')}/{state.get('steps')}")
    elif phase == "epoch done":
        parts.append("done")
    else:
        parts.append(phase or "starting")
    if state.get("loss") is not None:
        parts.append(f"loss {state['loss']:.4f}")
    if state.get("val") is not None:
        parts.append(f"val {state['val']:.2f}%")
    if state.get("img_per_s"):
        parts.append(f"{state['img_per_s']:,.0f} img/s")
    if state.get("eta_s") is not None:
        parts.append(f"ETA {fmt_time(state['eta_s'])}")
    return " | ".join(parts)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or being replaced right now


class LiveBoard:
    """Draws ``[(label, status_file), ...]`` as one line each.

    Args:
        stream: where to draw (default stderr); a terminal gets lines redrawn in place every ``interval``
            seconds, anything else gets them through ``say`` every ``log_interval`` seconds.
        say: how a non-terminal writes a line (default: ``stream``).
    """

    def __init__(self, stream: TextIO | None = None, say: Callable[[str], None] | None = None,
                 interval: float = 1.0, log_interval: float = 60.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.say = say or (lambda line: print(line, file=self.stream, flush=True))
        self.interval = interval if self.tty else log_interval
        self._drawn = 0
        self._last = time.monotonic() if not self.tty else -1e9
        self._width = 100

    def lines(self, workers: Sequence[tuple[str, Path]]) -> list[str]:
        width = max((len(label) for label, _ in workers), default=0)
        return [f"  {label:<{width}}  {status_text(read_status(path))}" for label, path in workers]

    def update(self, workers: Sequence[tuple[str, Path]], force: bool = False) -> None:
        now = time.monotonic()
        if not workers or (not force and now - self._last < self.interval):
            return
        self._last = now
        lines = self.lines(workers)
        if not self.tty:
            for line in lines:
                self.say(line)
            return
        import shutil

        self._width = shutil.get_terminal_size((100, 20)).columns
        self.clear()
        for line in lines:
            self.stream.write(line[: self._width - 1] + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def clear(self) -> None:
        """Remove the drawn lines (a terminal), so that a message can be printed above them."""
        if self.tty and self._drawn:
            self.stream.write("\x1b[1A\x1b[2K" * self._drawn + "\r")
            self.stream.flush()
        self._drawn = 0
