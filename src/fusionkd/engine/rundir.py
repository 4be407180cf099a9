"""A run folder belongs to one process at a time: :class:`RunLock`, and the repairs a start makes.

The lock is an OS-level ``flock`` on ``RUN_DIR/.lock``, taken before anything in the folder is read for
writing, deleted or written, and held until the run ends. The kernel releases it when the process dies in
any way (``kill -9`` included), so a crashed run never leaves a stale lock behind. The file holds the
holder's PID, host, start time and command line, which a refused second process shows.

Under torchrun only rank 0 holds it (the other ranks never write into the folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import StorageError, storage_error
from .config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock; the message names it."""


class RunLock:
    """The exclusive lock of one run folder (create the folder if needed).

    ``RunLock(run_dir)`` acquires at once or raises :class:`RunLockedError`; :meth:`release` (or leaving a
    ``with`` block) lets it go. Re-acquiring in the same process through another ``RunLock`` is refused
    too (``flock`` locks belong to open files, not processes).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        for _ in range(20):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise storage_error(self.path, e, "create the run folder's lock file") from e
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise RunLockedError(self._refusal()) from None
                    raise storage_error(self.path, e, "lock") from e
            # the folder may have been removed and made again between open and flock: lock the file that is
            # there now, not an unlinked one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)
        else:  # pragma: no cover - needs a pathological race
            raise RunLockedError(f"could not lock {self.path}: the folder keeps being replaced by another process")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)

    def _refusal(self) -> str:
        holder: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(self.path.read_text() or "{}")
        who = (f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               + (f": {holder['command']}" if holder.get("command") else "")) if holder else "another process"
        return (f"run folder {str(self.run_dir)!r} is in use by another fusionkd process ({who}). Two runs in one "
                "folder would mix their epochs and checkpoints: wait for it to finish, stop it, or choose another "
                "name=/out_dir=")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def remove_folder(self) -> None:
        """Delete the whole run folder (lock file last, while still holding it), then release."""
        for p in list(self.run_dir.iterdir()) if self.run_dir.is_dir() else []:
            if p.name != LOCK_NAME:
                _remove(p)
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()  # fails (harmlessly) if another process has begun to use the name
        self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError as e:
        raise storage_error(p, e, "delete") from e


def clear_folder(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but the lock file (call it holding the lock)."""
    for p in list(run_dir.iterdir()):
        if p.name != LOCK_NAME:
            _remove(p)


def folder_entries(run_dir: Path) -> set[str]:
    """Names in ``run_dir`` other than the lock file (empty when the folder does not exist)."""
    return {p.name for p in run_dir.iterdir() if p.name != LOCK_NAME} if run_dir.is_dir() else set()


def has_finished_epoch(run_dir: Path) -> bool:
    """Whether the folder holds a checkpoint or a summary, i.e. at least one finished epoch."""
    return any((run_dir / n).is_file() for n in ("last.pt", "best.pt", "summary.json"))


__all__ = ["RunLock", "RunLockedError", "StorageError", "clear_folder", "folder_entries", "has_finished_epoch"]
