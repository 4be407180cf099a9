"""Stops: Ctrl-C, ``SIGTERM`` and ``SIGHUP`` take one path (see :mod:`fusionkd.cli`, "Stops").

:func:`stop_signals_as_interrupts` turns the two signals into a :class:`StopSignal` (a ``KeyboardInterrupt``)
raised in the main thread, holding a stop back while a checkpoint is being written (and, through
:func:`~fusionkd.engine.trackers.defer_stop`, while a tracker writes to its store). Used by the ``fusionkd``
command and by the worker processes of ``fusionkd compare``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "StopSignal", "stop_signals_as_interrupts"]

#: signals that stop a command as Ctrl-C does (batch schedulers' preemption, a closed terminal)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class StopSignal(KeyboardInterrupt):
    """A stop signal (``SIGTERM``, ``SIGHUP``) raised in the main thread, so that it takes Ctrl-C's path."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: code during which a stop is held back until it returns (checkpoint files are written there: an exception
#: raised inside ``torch.save``'s writer turns into a RuntimeError that hides the stop)
_CRITICAL_FILES = (os.path.join("fusionkd", "engine", "checkpoint.py"), os.path.join("torch", "serialization.py"))
#: seconds between checks whether a held-back stop may be raised now
_RETRY_S = 0.05


def _in_critical_write(frame: Any) -> bool:
    """Whether the interrupted main thread is writing (or reading) a checkpoint (see :data:`_CRITICAL_FILES`)."""
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CRITICAL_FILES):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stop_signals_as_interrupts() -> Iterator[list[int]]:
    """While in the block, ``SIGTERM``/``SIGHUP`` raise :class:`StopSignal` in the main thread; yields the
    list of those signals received. The first one raises; later ones are ignored so that the stop can
    finish. Ctrl-C (``SIGINT``) raises ``KeyboardInterrupt`` as Python's own handler does.

    A stop is never raised in the middle of a write that it would spoil: while a checkpoint is being written
    it is held back and raised right after (checked every :data:`_RETRY_S` s), and while a tracker writes to
    its store (:func:`~fusionkd.engine.trackers.deferred_stops`) it is raised at the end of that write.
    Signals ignored on entry (``nohup``) stay ignored; handlers are restored on exit. Outside the main thread
    (where Python cannot set handlers) it does nothing.
    """
    import _thread

    from .trackers import defer_stop

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    state: dict[str, Any] = {"pending": None, "timer": None, "closed": False}

    def retry(signum: int) -> None:  # (timer thread) deliver the signal again: the handler checks again
        state["timer"] = None
        if not state["closed"]:
            _thread.interrupt_main(signum)

    def handler(signum: int, frame: Any) -> None:
        if state["pending"] is None:
            if signum == signal.SIGINT:
                state["pending"] = KeyboardInterrupt()
            elif received:
                return  # a second stop signal while stopping: let the stop finish
            else:
                received.append(signum)
                state["pending"] = StopSignal(signum)
        stop = state["pending"]
        if _in_critical_write(frame):
            if state["timer"] is None:
                state["timer"] = threading.Timer(_RETRY_S, retry, args=(signum,))
                state["timer"].daemon = True
                state["timer"].start()
            return
        state["pending"] = None
        if not defer_stop(stop):  # inside a tracker's write, it raises the stop when the write ends
            raise stop

    previous = {}
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN or (sig == signal.SIGINT and current is not signal.default_int_handler):
            continue  # ignored (nohup), or Ctrl-C handled by someone else (a host program): left alone
        previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        state["closed"] = True
        if state["timer"] is not None:
            state["timer"].cancel()
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
