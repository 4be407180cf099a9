"""The output folder of a comparison belongs to one ``compare`` at a time: :func:`lock_output` holds an
OS-level lock on ``OUT/.lock`` (the :class:`~fusionkd.engine.rundir.RunLock` of run folders) and refuses a
second holder at once, naming the first, or waits for it (``fusionkd tune``'s confirmations)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..engine.rundir import LOCK_NAME, RunLock, RunLockedError
from ..errors import CompareLockedError

__all__ = ["CompareLockedError", "lock_output"]


def _holder(out: Path) -> str:
    """Who holds ``out``'s lock, from the lock file (PID, host, start time, command)."""
    try:
        info = json.loads((out / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "another process"
    return (f"PID {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f": {info['command']}" if info.get("command") else ""))


def lock_output(out: Path, wait: bool = False, report: Callable[[str], None] | None = None,
                poll_s: float = 2.0) -> RunLock:
    """Take the output folder's lock (creating the folder), so that one ``compare`` at a time uses it.

    Args:
        out: the comparison's output folder.
        wait: when another process holds it, wait for it to finish (``fusionkd tune``'s workers confirming
            one study) instead of refusing.
        report: told once that this process waits (with ``wait``).
        poll_s: seconds between attempts while waiting.

    Raises:
        CompareLockedError: another live process holds the folder (and ``wait`` is False).
    """
    told = False
    while True:
        try:
            return RunLock(out)
        except RunLockedError:
            who = _holder(out)
            if not wait:
                raise CompareLockedError(
                    f"output folder {str(out)!r} is in use by another fusionkd compare ({who}). One output "
                    "folder belongs to one compare at a time (two would train the same runs twice): wait for "
                    "it to finish, stop it, or choose another --out") from None
            if not told and report is not None:
                report(f"{out} is in use by another process ({who}); waiting for it to finish")
                told = True
            time.sleep(poll_s)
