"""The run folder's lifecycle for one invocation: claim it (fresh or resumed) under its lock, check that a
resumed folder's files agree (identity, ``best.pt``, ``metrics.jsonl``), keep ``train.log``, and on a refused
input remove only what this invocation made."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from ..data import DataFormatError, DatasetNotFoundError
from .checkpoint import (
    CheckpointError,
    StorageError,
    atomic_copy,
    best_is_last,
    load_checkpoint,
    read_checkpoint_file,
    storage_error,
)
from .config import Config, ConfigError
from .records import RESUME_MUTABLE, config_differences, config_hash, record_best_test, truncate_metrics
from .rundir import (
    RunLock,
    claim_problem,
    clear_folder,
    folder_entries,
    has_finished_epoch,
    is_marked,
    mark,
    remove_stale_temps,
)

log = logging.getLogger("fusionkd")

#: errors that mean "this input cannot run": a folder made by this invocation is removed again
REFUSALS = (ConfigError, CheckpointError, DatasetNotFoundError, DataFormatError, ValueError, ImportError)


def read_config_yaml(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{run_dir / 'config.yaml'} cannot be read ({e}); restore it or start the run again "
                              "with --overwrite") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{run_dir / 'config.yaml'} does not hold a mapping of options")
    return data


def read_epoch(path: Path) -> int | None:
    """The ``epoch`` of a checkpoint file, read without building anything (memory-mapped)."""
    return read_checkpoint_file(path).get("epoch")


def resume_config(run_dir: Path, overrides: dict[str, Any] | None) -> tuple[Config, dict[str, Any] | None]:
    """The config to continue ``run_dir`` with (its own, with ``overrides`` of :data:`RESUME_MUTABLE`
    options), and its ``last.pt`` (None: no epoch finished, it starts again from epoch 1)."""
    from .config import build_dataclass, deep_merge, nest, validate

    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume {str(run_dir)!r}: no such run folder")
    ckpt = None
    if (run_dir / "last.pt").is_file():
        ckpt = load_checkpoint(run_dir / "last.pt")
        base = dict(ckpt.get("config") or {})
        if not base:
            raise CheckpointError(f"{run_dir / 'last.pt'}: holds no config; it is not a training checkpoint")
    elif (run_dir / "config.yaml").is_file():
        if any((run_dir / n).is_file() for n in ("best.pt", "summary.json")):
            raise CheckpointError(
                f"cannot resume {str(run_dir)!r}: it has best.pt/summary.json but no last.pt, so the "
                "training state to continue from is gone; start it again with --overwrite")
        base = read_config_yaml(run_dir)
    else:
        raise CheckpointError(f"cannot resume {str(run_dir)!r}: it has neither last.pt nor config.yaml "
                              "(is it a fusionkd run folder?)")
    changes = nest(overrides or {})
    bad = sorted(k for k in changes if k not in RESUME_MUTABLE and changes[k] != base.get(k))
    if bad:
        raise ConfigError(
            f"cannot change {', '.join(bad)} when resuming (the checkpoint was made with other values); "
            f"options that may change on resume: {', '.join(sorted(RESUME_MUTABLE))}"
        )
    from ..plugins import importing_for

    with importing_for(f"resuming {run_dir}"):  # its plug-in files are named before their code runs
        cfg = build_dataclass(Config, deep_merge(base, changes))
        validate(cfg)
    done = int(ckpt["epoch"]) if ckpt is not None else 0
    if cfg.epochs < done:
        raise ConfigError(f"epochs={cfg.epochs} is less than the {done} epochs already trained")
    return cfg, ckpt


def finished_summary(run_dir: Path, cfg: Config, ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary of a run that has trained all its epochs already (None otherwise)."""
    if ckpt is not None and int(ckpt["epoch"]) == cfg.epochs and (run_dir / "summary.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads((run_dir / "summary.json").read_text())
    return None


class RunFolder:
    """One invocation's hold on ``run_dir``: :meth:`claim` (lock, then open fresh or resumed),
    :meth:`open_log`, then :meth:`refused` (a refused input) and/or :meth:`close`."""

    def __init__(self, run_dir: Path, overwrite: bool = False) -> None:
        self.run_dir = run_dir
        self.overwrite = overwrite
        self.lock: RunLock | None = None
        self.log_handler: logging.Handler | None = None
        self.made_folder = False  # this invocation created (or restarted) the folder
        self.owned_before = False  # the folder was a marked fusionkd run folder before this invocation

    def check_fresh(self) -> None:
        """Refuse early (before any data is loaded) a folder this run may not take: one that holds anything
        fusionkd did not write, one it did not make (unless empty), or finished epochs without ``overwrite``
        (:func:`~fusionkd.engine.rundir.claim_problem`)."""
        problem = claim_problem(self.run_dir, overwrite=self.overwrite)
        if problem:
            raise ConfigError(problem)

    def claim(self, resuming: bool, resume_ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
        """Lock the folder and open it; returns ``last.pt`` as read again under the lock (resuming). A
        refusal leaves the folder as found: only what this lock made goes again."""
        try:
            if not resuming:
                self.check_fresh()  # before the lock file is made in a folder that is not ours
            self.lock = RunLock(self.run_dir)
            if resuming:
                return self.open_resume(resume_ckpt)
            self.open_fresh()
            return None
        except (ConfigError, CheckpointError, StorageError):
            if self.lock is not None:
                self.lock.discard(files=False, folder=False)
                self.lock = None
            raise

    def open_fresh(self) -> None:
        """Holding the lock: make the folder ready for epoch 1. Only a marked fusionkd run folder is ever
        cleared, and then only of the files fusionkd writes (never a finished epoch unless ``overwrite``)."""
        d = self.run_dir
        self.owned_before = is_marked(d)
        self.check_fresh()  # again, under the lock
        entries = folder_entries(d)
        if entries:  # a marked folder holding only fusionkd's files (claim_problem refused anything else)
            if not has_finished_epoch(d):
                log.info("%s holds a run that never finished an epoch (%s); starting it again from epoch 1",
                         d, ", ".join(sorted(entries)))
            clear_folder(d)
        mark(d)
        self.made_folder = True

    def open_resume(self, resume_ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
        """Holding the lock: clean what a stop left behind and check that the folder's files agree."""
        d = self.run_dir
        removed = remove_stale_temps(d)
        stored = read_config_yaml(d) if (d / "config.yaml").is_file() else None
        if resume_ckpt is None:  # no finished epoch: start again from epoch 1 with the stored config
            if (d / "last.pt").is_file():
                raise ConfigError(f"{d}: a last.pt appeared while this command started (another process is "
                                  "using the folder?); run the command again")
            for name in ("metrics.jsonl", "error.log"):
                (d / name).unlink(missing_ok=True)
            log.info("%s never finished an epoch: training it from epoch 1 with its stored config.yaml", d)
        else:
            ckpt = load_checkpoint(d / "last.pt")  # again, under the lock
            if ckpt.get("epoch") != resume_ckpt.get("epoch"):
                raise ConfigError(f"{d}/last.pt changed while this command started (another process was "
                                  "writing it); run the command again")
            resume_ckpt = ckpt
            self.check_identity(ckpt, stored)
            self.repair_best(ckpt)
            truncate_metrics(d, int(ckpt["epoch"]))
        mark(d)  # a folder from before the marker: its config and checkpoint were just read as fusionkd's
        if removed:
            log.info("removed %d unfinished temporary file(s) left by an interrupted write: %s", len(removed),
                     ", ".join(removed))
        return resume_ckpt

    def check_identity(self, ckpt: dict[str, Any], stored: dict[str, Any] | None) -> None:
        """``last.pt`` must belong to this folder: same method, model, dataset, seed and config hash as
        its ``config.yaml``."""
        mine = dict(ckpt.get("config") or {})
        recorded = (ckpt.get("run") or {}).get("config_hash")
        if recorded is not None and recorded != config_hash(mine):
            raise CheckpointError(f"{self.run_dir / 'last.pt'}: its config does not match its own config hash; "
                                  "the file was altered outside fusionkd")
        if stored is None:
            log.warning("%s has no config.yaml; trusting last.pt's config", self.run_dir)
            return
        diffs = config_differences(stored, mine)
        if diffs:
            named = [x for x in diffs if x.split(":", 1)[0] in ("method", "model", "dataset", "seed")]
            raise CheckpointError(
                f"{self.run_dir / 'last.pt'} does not belong to this run folder: its config differs from the "
                f"folder's config.yaml ({'; '.join((named or diffs)[:6])}). Was another run's last.pt copied in? "
                "Put the right last.pt back, or start the run again with --overwrite"
            )

    def repair_best(self, last: dict[str, Any]) -> None:
        """Make ``best.pt`` hold the epoch that ``last.pt`` records as best. ``last.pt`` is written before
        ``best.pt``, so the only disagreement a stop can leave is a ``best.pt`` one epoch behind a ``last.pt``
        whose own epoch is the best; then ``best.pt`` is rebuilt from ``last.pt``."""
        best = last.get("best")
        path = self.run_dir / "best.pt"
        if best is None:
            return
        try:
            held = read_epoch(path) if path.is_file() else None
        except CheckpointError:
            held = None  # unreadable: rebuilt below when possible
        if held == best["epoch"]:
            if best.get("test") is not None and best_is_last(last) is False:
                if (read_checkpoint_file(path).get("metrics") or {}).get("test") is None:
                    record_best_test(self.run_dir, best)  # a stop after last.pt, before best.pt got its test
            return
        if best_is_last(last):
            atomic_copy(self.run_dir / "last.pt", path)
            log.info("best.pt held epoch %s but last.pt records epoch %s as best (a stop between the two writes): "
                     "rebuilt best.pt from last.pt", held, best["epoch"])
            return
        raise CheckpointError(
            f"{path} holds epoch {held} but last.pt records epoch {best['epoch']} as the best one; best.pt was "
            f"changed outside fusionkd and epoch {best['epoch']}'s weights are gone. Restore best.pt, or start the "
            "run again with --overwrite"
        )

    def open_log(self) -> None:
        """Append this invocation's log to ``train.log`` (at INFO, even when the caller set up no logging)."""
        try:
            handler = logging.FileHandler(self.run_dir / "train.log")
        except OSError as e:
            raise storage_error(self.run_dir / "train.log", e, "open") from e
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        self.log_handler = handler
        if log.getEffectiveLevel() > logging.INFO:  # API use without logging set up: still fill train.log
            log.setLevel(logging.INFO)

    def log_line(self, line: str) -> None:
        """``line`` into ``train.log`` only (the progress bar, or silence, shows it elsewhere or not at all)."""
        if self.log_handler is not None:
            self.log_handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None))

    def close_log(self) -> None:
        if self.log_handler is not None:
            log.removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None

    def refused(self) -> None:
        """A refused input leaves no run folder behind; a folder that was there before and not fusionkd's
        (an empty one the user made) stays, and only fusionkd's files ever go."""
        self.close_log()
        if self.lock is not None and self.made_folder and not has_finished_epoch(self.run_dir):
            made = self.run_dir in self.lock.created_dirs
            self.lock.discard(files=True, folder=made or self.owned_before)

    def close(self) -> None:
        self.close_log()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
