"""A run folder belongs to one process at a time: :class:`RunLock`, and the repairs a start makes.

The lock is an OS-level ``flock`` on ``RUN_DIR/.lock``, taken before anything in the folder is read for
writing, deleted or written, and held until the run ends. The kernel releases it when the process dies in
any way (``kill -9`` included), so a crashed run never leaves a stale lock behind. The file holds the
holder's PID, host, start time and command line, which a refused second process shows.

Under torchrun only rank 0 holds it (the other ranks never write into the folder).

**Ownership.** fusionkd deletes only what it can prove it created. A run folder it makes carries a marker file,
``RUN_DIR/.fusionkd-run``; only a marked folder is ever cleared (for a restart or ``--overwrite``), and then only
the files fusionkd writes there (:data:`RUN_FILES`, :data:`RUN_SUBDIRS` and their interrupted temporary files).
A folder that holds anything else (a user's file, other runs below it) is refused with the names of what it
holds; an unmarked folder is used only when it is empty. :func:`claim_problem` is that rule.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import RunLockedError
from .checkpoint import StorageError, storage_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
#: the file that marks a folder as a run folder fusionkd made (its content: who made it, when)
MARKER_NAME = ".fusionkd-run"
#: every file fusionkd writes at the top of a run folder
RUN_FILES = frozenset({
    LOCK_NAME, MARKER_NAME, "config.yaml", "metrics.jsonl", "train.log", "error.log", "last.pt", "best.pt",
    "summary.json", "mlflow_run.json",
})
#: the folders fusionkd writes in a run folder (the TensorBoard tracker's event files)
RUN_SUBDIRS = frozenset({"tb"})
#: an interrupted atomic write of one of RUN_FILES: ``.NAME.XXXXXXXX.tmp`` (tempfile.mkstemp's pattern)
_RUN_FILE_ALTERNATIVES = "|".join(re.escape(n) for n in sorted(RUN_FILES))
_TEMP = re.compile(rf"^\.({_RUN_FILE_ALTERNATIVES})\.[A-Za-z0-9_]+\.tmp$")


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
        #: the folders this lock made (``run_dir`` and any missing parents, outermost first)
        self.created_dirs: list[Path] = []
        #: whether this lock made the lock file (rather than finding one left by an earlier run)
        self.created_lock = False
        for _ in range(20):
            try:
                self.created_dirs += make_dirs(self.run_dir)
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    self.created_lock = True
                except FileExistsError:
                    fd = os.open(self.path, os.O_RDWR)
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

    def discard(self, *, files: bool, folder: bool) -> None:
        """Undo a start that was refused, then release. ``files``: the fusionkd files in the (marked) folder
        are this start's own (delete them and the marker); ``folder``: the folder is fusionkd's to remove when
        empty. The lock file goes if this lock made it (or with the files), the folders this lock made go
        when empty. Nothing fusionkd did not write is ever touched."""
        d = self.run_dir
        if files and is_marked(d):
            clear_folder(d)
            with contextlib.suppress(OSError):
                (d / MARKER_NAME).unlink()
        if self.created_lock or (files and not folder_entries(d) and not (d / MARKER_NAME).exists()):
            with contextlib.suppress(OSError):
                self.path.unlink()
        targets = list(reversed(self.created_dirs))
        if folder and d not in targets:
            targets.insert(0, d)
        for f in targets:
            with contextlib.suppress(OSError):
                f.rmdir()  # only an empty folder; fails harmlessly if anything is in it
        self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it made, outermost first (none when it already existed)."""
    missing = []
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError as e:
        raise storage_error(p, e, "delete") from e


def is_fusionkd_entry(name: str) -> bool:
    """Whether ``name`` at the top of a run folder is one fusionkd writes (a run file, ``tb/``, or an
    interrupted temporary file of a run file)."""
    return name in RUN_FILES or name in RUN_SUBDIRS or bool(_TEMP.match(name))


def is_marked(run_dir: Path) -> bool:
    """Whether ``run_dir`` carries the marker of a run folder fusionkd made."""
    return (run_dir / MARKER_NAME).is_file() and not (run_dir / MARKER_NAME).is_symlink()


def mark(run_dir: Path) -> None:
    """Mark ``run_dir`` as a run folder fusionkd made (call it holding the lock)."""
    from .checkpoint import atomic_write_text

    if not is_marked(run_dir):
        info = {"made_by": "fusionkd", "host": socket.gethostname(), "pid": os.getpid(),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "note": "fusionkd clears or replaces this folder's own files only (never other files in it)"}
        atomic_write_text(json.dumps(info) + "\n", run_dir / MARKER_NAME)


def clear_folder(run_dir: Path) -> None:
    """Delete the files fusionkd wrote in ``run_dir`` (but the lock and the marker); call it holding the lock.
    Anything else in the folder is left as it is (callers refuse such folders before they get here)."""
    for p in list(run_dir.iterdir()):
        if p.name not in (LOCK_NAME, MARKER_NAME) and is_fusionkd_entry(p.name):
            _remove(p)


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete the temporary files that an interrupted atomic write of a run file left (holding the lock);
    returns their names. Other ``*.tmp`` files are not fusionkd's and stay."""
    removed = []
    for p in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if _TEMP.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p.name)
    return removed


def folder_entries(run_dir: Path) -> set[str]:
    """Names in ``run_dir`` other than the lock file and the marker (empty when the folder does not exist)."""
    return {p.name for p in run_dir.iterdir() if p.name not in (LOCK_NAME, MARKER_NAME)} if run_dir.is_dir() \
        else set()


def foreign_entries(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that fusionkd does not write there, sorted."""
    return sorted(n for n in folder_entries(run_dir) if not is_fusionkd_entry(n))


def has_finished_epoch(run_dir: Path) -> bool:
    """Whether the folder holds a checkpoint or a summary, i.e. at least one finished epoch."""
    return any((run_dir / n).is_file() for n in ("last.pt", "best.pt", "summary.json"))


def describe_entries(run_dir: Path, names: list[str] | set[str], limit: int = 6) -> str:
    """``'thesis.tex, baseline-resnet20-s0/ (a fusionkd run) and 3 more'``."""
    parts = []
    for n in sorted(names)[:limit]:
        p = run_dir / n
        if p.is_dir() and not p.is_symlink():
            run = is_marked(p) or has_finished_epoch(p) or (p / "config.yaml").is_file()
            parts.append(f"{n}/ (a fusionkd run)" if run else f"{n}/")
        else:
            parts.append(n)
    more = len(names) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def claim_problem(run_dir: Path, *, overwrite: bool) -> str | None:
    """Why a fresh run may not take ``run_dir`` (None: it may). The rule: a folder that does not exist or is
    empty may be taken; a marked fusionkd run folder may be restarted (never finished an epoch) or replaced
    (``overwrite``) as long as it holds nothing fusionkd did not write; anything else is refused."""
    d = run_dir
    if not d.exists() and not d.is_symlink():
        return None
    if not d.is_dir():
        return f"{str(d)!r} exists and is not a folder; choose another name=/out_dir="
    try:
        entries = folder_entries(d)
    except OSError as e:
        return f"run folder {str(d)!r} cannot be read ({e.strerror or e}); choose another name=/out_dir="
    if not entries:
        return None
    if not is_marked(d) and all(_TEMP.match(n) and n.startswith(f".{MARKER_NAME}.") for n in entries):
        return None  # another process is marking it right now (its lock will say so) or a stop left the temp
    if not is_marked(d):
        legacy = has_finished_epoch(d) or (d / "config.yaml").is_file()
        hint = (" It looks like a run folder from a fusionkd before run folders were marked: continue it with "
                f"`fusionkd train --resume {d}`, or delete it yourself to start again.") if legacy else ""
        return (f"run folder {str(d)!r} already exists and holds {describe_entries(d, entries)}, and it is not a "
                f"run folder fusionkd made (it has no {MARKER_NAME} marker). fusionkd trains only into an empty "
                "folder or one it made, and never deletes what it did not write"
                f"{' (--overwrite included)' if overwrite else ''}: choose another name=/out_dir=, or empty the "
                f"folder yourself.{hint}")
    foreign = foreign_entries(d)
    if foreign:
        return (f"run folder {str(d)!r} holds {describe_entries(d, foreign)}, which fusionkd did not write; it "
                f"never deletes such files{' (--overwrite included)' if overwrite else ''}. Move them out of the "
                "folder, or choose another name=/out_dir=")
    if has_finished_epoch(d) and not overwrite:
        what = "a finished run" if (d / "summary.json").exists() else "an unfinished run"
        return (f"run folder {str(d)!r} already holds {what}. Resume it with `fusionkd train --resume {d}`, "
                "choose another name=/out_dir=, or pass --overwrite to replace it")
    return None


__all__ = ["LOCK_NAME", "MARKER_NAME", "RUN_FILES", "RUN_SUBDIRS", "RunLock", "RunLockedError", "StorageError",
           "claim_problem", "clear_folder", "folder_entries", "foreign_entries", "has_finished_epoch",
           "is_fusionkd_entry", "is_marked", "mark", "remove_stale_temps"]
