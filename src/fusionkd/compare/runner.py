"""Running the tasks of a comparison's plan (:class:`GridRunner`): in this process (one worker) or in
``python -m fusionkd.compare._worker`` processes (``workers > 1``, with live lines of the running ones), the
baseline teacher first, a progress line per run, and :func:`execute`, which trains or resumes one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.config import Config, ConfigError, build_dataclass, validate
from ..engine.rundir import is_marked
from .live import LiveBoard
from .planning import Task
from .report import Failure

if TYPE_CHECKING:
    from .grid import CompareSpec

Report = Callable[[str], None]
#: errors of one run that every other run would hit too (the data): they stop the whole comparison
FATAL_ERRORS = frozenset({"DatasetNotFoundError", "DataFormatError", "DownloadError"})
#: what trains one run in this process: :func:`execute`'s signature
Execute = Callable[..., dict[str, Any]]


def execute(config: dict[str, Any], action: str, threads: int, device: str | None, progress: str | None = None,
            status_file: str | None = None) -> dict[str, Any]:
    """Train (``fresh``/``overwrite``) or resume one run in this process; never raises for a failed run.

    ``progress`` replaces the run's progress mode (it does not change results; a worker process uses "log" so
    that its epoch lines land in its log); ``status_file`` receives the live state (see
    :mod:`fusionkd.compare.live`).

    Returns ``{"ok": True, "summary": ...}`` or ``{"ok": False, "error": "..."}`` (the traceback is written
    to ``error.log`` in the run folder when that folder is one fusionkd made, i.e. carries its marker: a
    folder refused because it is not fusionkd's, or never made, gets nothing written into it).
    """
    from ..engine.trainer import Trainer

    cfg = build_dataclass(Config, config)
    try:
        if action == "resume":
            overrides: dict[str, Any] = {"threads": threads, "progress": progress or "none"}
            if device:
                overrides["device"] = device
            trainer = Trainer.resume(cfg.run_dir, overrides)
        else:
            cfg.threads = threads
            if device:
                cfg.device = device
            if progress:
                cfg.progress = progress
            validate(cfg)
            trainer = Trainer(cfg, overwrite=action == "overwrite")
        if status_file:
            trainer.status_file = Path(status_file)
        result = trainer.fit()
        (cfg.run_dir / "error.log").unlink(missing_ok=True)
        return {"ok": True, "summary": result.summary}
    except Exception as e:  # a failed run is reported and the comparison goes on
        if is_marked(cfg.run_dir):
            with contextlib.suppress(OSError):
                (cfg.run_dir / "error.log").write_text(traceback.format_exc())
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "type": type(e).__name__}


@dataclass
class _Running:
    task: Task
    proc: subprocess.Popen
    slot: int
    result_file: Path
    log_file: Path
    t0: float
    status_file: Path


def _slug(task: Task) -> str:
    return "teacher" if task.is_teacher else f"{task.model}-{task.method}-s{task.seed}"


def _deploy_text(summary: dict[str, Any]) -> str:
    head = summary["deploy_head"]
    last = summary["last"]["test"][head]
    best = summary.get("best") or {}
    text = f"test {last:.2f}% ({head}, last epoch"
    if best.get("epoch") is not None and best.get("selection") == "val":
        text += f"; best-val epoch {best['epoch']}: {(best.get('test') or {}).get(head, float('nan')):.2f}%"
    text += ")"
    others = [f"{h} {a:.2f}" for h, a in summary["last"]["test"].items() if h != head]
    return text + (f"; other heads {', '.join(others)}" if others else "")


def _fmt_s(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class GridRunner:
    """Runs the tasks of a plan: in this process (one worker) or in worker processes."""

    def __init__(self, spec: CompareSpec, report: Report, total_runs: int, in_process: Execute | None = None
                 ) -> None:
        self.spec = spec
        #: trains a run in this process (one worker); :func:`execute` unless given
        self.in_process = in_process or execute
        self.report = report
        self.total_runs = total_runs
        self.threads = spec.threads_per_worker()
        n_dev = len(spec.devices or [])
        self.slot_devices = [spec.devices[i % n_dev] if n_dev else None for i in range(spec.workers)]
        self.failures: list[Failure] = []
        self.finished = 0

    def run(self, teacher: Task | None, tasks: list[Task]) -> None:
        todo = ([teacher] if teacher else []) + tasks
        total = len(tasks)
        for t in todo:
            if t.action == "keep":
                self._kept(t)
        pending = [t for t in todo if t.action != "keep"]
        if not pending:
            self.report(f"all {total} runs were finished earlier; nothing to train")
            return
        grid_pending = sum(1 for t in pending if not t.is_teacher)
        first = ", after training the teacher" if teacher is not None and teacher in pending else ""
        self.report(f"{grid_pending} of {total} runs to train{first} "
                    f"({self.spec.workers} worker(s) × {self.threads} thread(s) each)")
        teacher_ok = teacher is None or teacher.action == "keep"
        if self.spec.workers == 1:
            for t in pending:
                if t.needs_teacher and not teacher_ok:
                    self._fail(t, "its teacher did not train", 0.0)
                    continue
                self._started(t)
                t0 = time.perf_counter()
                # in this process: the trainer's own display (a bar on a terminal, epoch lines otherwise)
                res = self.in_process(t.config.to_dict(), t.action, self.threads, self.slot_devices[0],
                                      progress="auto")
                ok = self._done(t, res, time.perf_counter() - t0)
                teacher_ok = teacher_ok or (t.is_teacher and ok)
            return
        self._run_pool(pending, teacher_ok)

    # ------------------------------------------------------------------ worker processes
    def _run_pool(self, pending: list[Task], teacher_ok: bool) -> None:
        logs = self.spec.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        running: list[_Running] = []
        free = list(range(self.spec.workers))
        teacher_state = "ok" if teacher_ok else "pending"
        raw_report = self.report
        board = LiveBoard(say=raw_report)

        def report(line: str) -> None:  # messages go above the live lines
            board.clear()
            raw_report(line)

        self.report = report
        try:
            while pending or running:
                board.update([(f"[{r.slot + 1}] {_slug(r.task)}", r.status_file)
                              for r in sorted(running, key=lambda r: r.slot)])
                for t in [t for t in pending if t.needs_teacher and teacher_state == "failed"]:
                    pending.remove(t)
                    self._fail(t, "its teacher did not train", 0.0)
                while free:
                    ready = [t for t in pending if not t.needs_teacher or teacher_state == "ok"]
                    if not ready:
                        break
                    t = ready[0]
                    pending.remove(t)
                    running.append(self._spawn(t, free.pop(0), logs))
                time.sleep(0.2)
                for r in list(running):
                    if r.proc.poll() is None:
                        continue
                    running.remove(r)
                    free.append(r.slot)
                    free.sort()
                    res = self._read_result(r)
                    ok = self._done(r.task, res, time.perf_counter() - r.t0)
                    if r.task.is_teacher:
                        teacher_state = "ok" if ok else "failed"
        finally:
            board.clear()
            self.report = raw_report
            for r in running:  # interrupted: stop the workers (their last finished epoch is in last.pt)
                r.proc.terminate()
            for r in running:
                try:
                    r.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    r.proc.kill()

    def _spawn(self, t: Task, slot: int, logs: Path) -> _Running:
        slug = _slug(t)
        task_file, result_file, log_file = logs / f"{slug}.task.json", logs / f"{slug}.result.json", \
            logs / f"{slug}.log"
        status_file = logs / f"{slug}.status.json"
        result_file.unlink(missing_ok=True)
        status_file.unlink(missing_ok=True)
        device = self.slot_devices[slot]
        task = {"config": t.config.to_dict(), "action": t.action, "threads": self.threads, "device": device,
                "progress": "log", "status_file": str(status_file)}
        task_file.write_text(json.dumps(task))
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        with open(log_file, "ab") as lf:
            proc = subprocess.Popen([sys.executable, "-m", "fusionkd.compare._worker", "run", str(task_file),
                                     str(result_file)], stdout=lf, stderr=subprocess.STDOUT, env=env)
        self._started(t, f" on {device}" if device else "")
        return _Running(t, proc, slot, result_file, log_file, time.perf_counter(), status_file)

    @staticmethod
    def _read_result(r: _Running) -> dict[str, Any]:
        try:
            res = json.loads(r.result_file.read_text())
            r.result_file.unlink(missing_ok=True)
            (r.result_file.parent / r.result_file.name.replace(".result.", ".task.")).unlink(missing_ok=True)
            return res
        except (OSError, json.JSONDecodeError):
            return {"ok": False, "error": f"the worker process exited with code {r.proc.returncode} without "
                                          f"a result (see {r.log_file})"}

    # ------------------------------------------------------------------ progress lines
    def _kept(self, t: Task) -> None:
        summary = json.loads((t.run_dir / "summary.json").read_text())
        if not t.is_teacher:
            self.finished += 1
        self.report(f"{t.label}: finished earlier, kept: {_deploy_text(summary)}")

    def _started(self, t: Task, where: str = "") -> None:
        what = "training"
        if t.action == "resume":
            what = f"resuming after epoch {t.done_epochs} of {t.config.epochs}"
        note = f" ({t.note})" if t.note else ""
        self.report(f"{t.label}: {what}{where}{note} ...")

    def _done(self, t: Task, res: dict[str, Any], seconds: float) -> bool:
        if not res.get("ok"):
            self._fail(t, res.get("error", "unknown error"), seconds)
            if res.get("type") in FATAL_ERRORS:
                raise ConfigError(f"{t.label}: {res['error']}. Every run reads the same data, so the "
                                  "comparison stops here; fix the data and run the same command again")
            return False
        if not t.is_teacher:
            self.finished += 1
        left = self._remaining()
        self.report(f"{t.label}: done in {_fmt_s(seconds)}, {_deploy_text(res['summary'])}"
                    + ("" if t.is_teacher else f" | {left} run(s) left"))
        return True

    def _fail(self, t: Task, error: str, seconds: float) -> None:
        self.failures.append(Failure(t.label, str(t.run_dir), error))
        log_hint = t.run_dir / "error.log"
        self.report(f"{t.label}: FAILED after {_fmt_s(seconds)}: {error}"
                    + (f" (traceback in {log_hint})" if log_hint.exists() else ""))

    def _remaining(self) -> int:
        failed = sum(1 for f in self.failures if not f.label.startswith("[teacher"))
        return self.total_runs - self.finished - failed
