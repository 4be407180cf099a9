"""Run a comparison grid (method × model × seed), each run in its own folder
``OUT/runs/<model>/<method>/s<seed>``.

* A run whose ``summary.json`` exists is **kept** (finished); a run with ``last.pt`` but no summary is
  **resumed** exactly where it stopped; so re-running an interrupted comparison finishes only what is left.
* A kept or resumed run must have been made with the same config as the one requested now (runtime-only
  options such as ``threads`` or ``device`` aside); otherwise the comparison stops before training anything
  and names the differences (``rerun_changed=True`` replaces such runs instead).
* ``workers > 1`` runs that many runs at once, each in its own ``python -m fusionkd.compare._worker``
  process with ``threads`` intra-op threads (default ``cpu_count // workers``), so processes do not
  oversubscribe the CPU; ``devices=["cuda:0", "cuda:1"]`` gives each worker slot a GPU, round-robin.
* Offline methods get ``teacher=PATH``, or a ``baseline`` teacher of ``teacher_model`` trained once with the
  same data settings (seed 0) in ``OUT/teachers/`` and reused while its settings are unchanged; other
  methods never get a teacher.

The output folder belongs to one ``compare`` at a time (two concurrent commands on one folder would train
the same runs twice): :func:`compare` holds an OS-level lock on ``OUT/.lock`` (:func:`lock_output`, the
:class:`~fusionkd.engine.rundir.RunLock` of run folders) from before it looks at any run folder until its
report is written, and a second ``compare`` on the folder is refused at once, with the holder named.

This module is the face (:class:`CompareSpec`, :func:`compare`); the jobs live in :mod:`.planning` (the plan:
arguments, configs, what to do with each folder), :mod:`.runner` (running the plan, worker processes, progress
lines) and :mod:`.lock` (the output folder's lock). Their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import ConfigError  # noqa: F401 - re-exported
from ..engine.rundir import LOCK_NAME
from ..errors import CompareLockedError  # noqa: F401 - re-exported
from ..methods import METHODS  # noqa: F401 - re-exported
from ..version import __version__
from .aggregate import load_run
from .lock import lock_output
from .planning import (  # noqa: F401 - re-exported: the plan's names are importable from here too
    IGNORED_KEYS,
    RESERVED_COMMON,
    Task,
    config_differences,
    file_layers,
    parse_method_options,
    parse_names,
    parse_seeds,
    plan,
)
from .report import Failure, ReportFiles, write_report
from .runner import FATAL_ERRORS, GridRunner, Report, execute  # noqa: F401 - re-exported

log = logging.getLogger("fusionkd")


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class CompareSpec:
    """What to compare and how (the arguments of ``fusionkd compare``)."""

    methods: list[str]
    models: list[str]
    seeds: list[int]
    out: Path = Path("runs/compare")
    common: dict[str, Any] = field(default_factory=dict)  #: config options of every run (dotted keys allowed)
    #: per-method settings, as from :func:`parse_method_options`
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: a YAML file of common options (under ``common``); its optional ``method_options: {METHOD: {KEY: VALUE}}``
    #: section adds per-method settings (``--method-options`` wins over it), e.g. ``fusionkd tune``'s
    #: ``best-compare.yaml``
    config_file: str | None = None
    teacher_model: str | None = None
    teacher_epochs: int | None = None
    workers: int = 1
    threads: int | None = None
    devices: list[str] | None = None
    rerun_changed: bool = False
    command: str | None = None  #: the command line, recorded in compare.json and the report
    title: str = "Comparison"

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def threads_per_worker(self) -> int:
        return self.threads or max(1, cpu_count() // max(1, self.workers))


@dataclass
class CompareResult:
    """What :func:`compare` returns."""

    out: Path
    tasks: list[Task]
    failures: list[Failure]
    report: ReportFiles


def compare(spec: CompareSpec, report: Report | None = None, wait: bool = False) -> CompareResult:
    """Run (or finish) the comparison grid of ``spec`` and write ``results.csv``, ``report.md`` and plots.

    Args:
        spec: what to compare (methods × models × seeds, common options, workers, teacher).
        report: called with each progress line (default: the ``fusionkd`` logger at INFO level).
        wait: when another process holds ``spec.out``, wait for it instead of refusing.

    Raises:
        CompareLockedError: another ``compare`` uses ``spec.out`` now (nothing was read or trained).
        ConfigError: bad options, a missing teacher, or runs stored with other settings.
    """
    say = report or log.info
    made = [d for d in [spec.out, *spec.out.parents] if not d.exists()]  # what taking the lock creates
    lock = lock_output(spec.out, wait=wait, report=say)
    try:
        try:
            teacher, tasks = plan(spec)
        except BaseException:
            _undo_folders(spec.out, made)  # a refused command leaves no folder it made behind
            raise
        return _run_locked(spec, say, teacher, tasks)
    finally:
        lock.release()


def _undo_folders(out: Path, made: list[Path]) -> None:
    """Remove the lock file and the folders that :func:`lock_output` made (innermost first), when ``out``
    holds nothing else (call it holding the lock)."""
    if not made or {p.name for p in out.iterdir()} - {LOCK_NAME}:
        return
    with contextlib.suppress(OSError):
        (out / LOCK_NAME).unlink()
    for d in made:
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty folder


def _run_locked(spec: CompareSpec, say: Report, teacher: Task | None, tasks: list[Task]) -> CompareResult:
    """:func:`compare` once it holds the output folder and has its plan."""
    manifest = {"command": spec.command, "methods": spec.methods, "models": spec.models, "seeds": spec.seeds,
                "common": spec.common, "method_options": spec.method_options,
                "teacher_model": spec.teacher_model, "teacher_epochs": spec.teacher_epochs,
                "fusionkd": __version__, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    (spec.out / "compare.json").write_text(json.dumps(manifest, indent=2, default=str))
    # the run in this process is this module's ``execute``, looked up now (a caller may have replaced it)
    runner = GridRunner(spec, say, len(tasks), in_process=execute)
    runner.run(teacher, tasks)
    records = [load_run(t.run_dir) for t in tasks if (t.run_dir / "summary.json").is_file()]
    files = write_report(records, spec.out, title=spec.title, command=spec.command, failures=runner.failures)
    return CompareResult(spec.out, tasks, runner.failures, files)
