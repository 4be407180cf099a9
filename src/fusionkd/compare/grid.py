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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import (
    Config,
    ConfigError,
    build_dataclass,
    nest,
    parse_override,
    resolve_config,
    validate,
)
from ..engine.rundir import LOCK_NAME, RunLock, RunLockedError, is_marked
from ..errors import CompareLockedError
from ..methods import METHODS
from ..models import MODELS
from ..registry import UnknownNameError
from ..version import __version__
from .aggregate import flatten, load_run
from .live import LiveBoard
from .report import Failure, ReportFiles, write_report

log = logging.getLogger("fusionkd")

#: config keys that may differ between a stored run and the requested one (they do not change results)
IGNORED_KEYS = frozenset({"progress", "log_every", "eval_test", "threads", "eval_batch_size", "tensorboard", "device",
                          "out_dir", "name", "tracker", "tracker_uri", "tracker_experiment"})
#: keys a comparison sets itself, with what to use instead
RESERVED_COMMON = {
    "method": "use --methods", "model": "use --models", "seed": "use --seeds", "name": "set by compare",
    "out_dir": "use --out", "options": "use --method-options METHOD:KEY=VALUE (options belong to one method)",
    "models": "use --method-options METHOD:models=[...] (only methods with peers accept it)",
    "threads": "use --threads", "device": "use --devices", "progress": "compare shows its own progress",
}

Report = Callable[[str], None]
#: errors of one run that every other run would hit too (the data): they stop the whole comparison
FATAL_ERRORS = frozenset({"DatasetNotFoundError", "DataFormatError", "DownloadError"})


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a mix -> sorted unique non-negative seeds."""
    seeds: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError
        except ValueError:
            raise ConfigError(f"seeds: {part!r} is not a seed or a range (e.g. 0,1,2 or 0-4)") from None
        seeds.update(range(first, last + 1))
    if not seeds:
        raise ConfigError("seeds: give at least one seed (e.g. --seeds 0,1,2)")
    return sorted(seeds)


def parse_names(text: str | Sequence[str], kind: str) -> list[str]:
    """Comma-separated registered names (``kind`` = "method" or "model"), checked, duplicates removed."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not names:
        raise ConfigError(f"--{kind}s: give at least one {kind} name")
    registry = METHODS if kind == "method" else MODELS
    for n in names:
        try:
            registry.entry(n)
        except UnknownNameError as e:
            raise ConfigError(f"--{kind}s: {e}") from None
    return names


def parse_method_options(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["ffl:peers=3", "ffl:lr=0.05"]`` -> ``{"ffl": {"options.peers": 3, "lr": 0.05}}``.

    A key that is one of the method's ``Options`` fields goes to ``options.KEY``; any other key must be a
    config option (e.g. ``lr``, ``models``, ``augment.cutout``) and applies to that method's runs only.
    """
    import dataclasses

    out: dict[str, dict[str, Any]] = {}
    config_fields = {f.name for f in dataclasses.fields(Config)}
    for item in items:
        if ":" not in item:
            raise ConfigError(f"--method-options {item!r}: expected METHOD:KEY=VALUE (e.g. ffl:peers=3)")
        method, kv = item.split(":", 1)
        method = method.strip()
        if method not in methods:
            raise ConfigError(f"--method-options {item!r}: {method!r} is not one of --methods "
                              f"({', '.join(methods)})")
        key, value = parse_override(kv)
        cls = METHODS.get(method)
        option_names = {f.name for f in dataclasses.fields(cls.Options)} if dataclasses.is_dataclass(
            cls.Options) else set()
        top = key.split(".", 1)[0]
        if key in option_names:
            key = f"options.{key}"
        elif top in ("method", "model", "seed", "name", "out_dir", "threads", "device", "progress"):
            raise ConfigError(f"--method-options {item!r}: {top!r} cannot be set per method "
                              f"({RESERVED_COMMON[top]})")
        elif top not in config_fields:
            raise ConfigError(
                f"--method-options {item!r}: {key!r} is neither an option of {method!r} "
                f"({', '.join(sorted(option_names)) or 'it has none'}) nor a config option "
                "(see docs/config.md)"
            )
        out.setdefault(method, {})[key] = value
    return out


# ---------------------------------------------------------------------- the plan
@dataclass
class Task:
    """One run of the grid (or the teacher): its config and what to do with its folder."""

    label: str
    config: Config
    method: str
    model: str
    seed: int
    index: int = 0  #: 1-based position in the grid; 0 for the teacher
    action: str = "fresh"  #: "keep" (finished), "resume", "fresh", "overwrite"
    done_epochs: int = 0
    is_teacher: bool = False
    needs_teacher: bool = False
    note: str = ""

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


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


def _stored_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run folder was made with (``config.yaml``, else ``last.pt``); None if neither is there."""
    if (run_dir / "config.yaml").is_file():
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if (run_dir / "last.pt").is_file():
        from ..engine.checkpoint import load_checkpoint

        return dict(load_checkpoint(run_dir / "last.pt")["config"])
    return None


def _norm(key: str, value: Any) -> str:
    if key in ("teacher", "teacher_weights", "weights") and value:
        value = str(Path(value).resolve())
    return json.dumps(value, sort_keys=True, default=str)


def config_differences(stored: dict[str, Any], requested: Config) -> list[str]:
    """``["epochs: 5 (stored) vs 10 (requested)", ...]`` over the keys that change results."""
    default = flatten(Config().to_dict())
    a, b = flatten(stored), flatten(requested.to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".", 1)[0] in IGNORED_KEYS:
            continue
        va, vb = a.get(key, default.get(key)), b.get(key, default.get(key))
        if _norm(key, va) != _norm(key, vb):
            diffs.append(f"{key}: {_value(va)} (stored) vs {_value(vb)} (requested)")
    return diffs


def _value(v: Any) -> str:
    return json.dumps(v, default=str) if not isinstance(v, str) else v


def _decide(task: Task, rerun_changed: bool) -> str | None:
    """Set ``task.action`` from its folder; return a problem description for a changed run."""
    d = task.run_dir
    finished, partial = (d / "summary.json").is_file(), (d / "last.pt").is_file()
    if not (finished or partial):
        task.action = "overwrite" if d.exists() and any(d.iterdir()) else "fresh"
        return None
    stored = _stored_config(d)
    diffs = ["no config.yaml to check its settings against"] if stored is None else \
        config_differences(stored, task.config)
    if diffs:
        what = "finished" if finished else "interrupted"
        if rerun_changed:
            task.action, task.note = "overwrite", f"replacing a {what} run made with other settings"
            return None
        return f"{d} ({what}): " + "; ".join(diffs)
    if finished:
        task.action = "keep"
    else:
        from ..engine.checkpoint import load_checkpoint

        task.action, task.done_epochs = "resume", int(load_checkpoint(d / "last.pt")["epoch"])
    return None


def file_layers(spec: CompareSpec) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The config file's common options and its ``method_options`` section (checked like the CLI's)."""
    if not spec.config_file:
        return {}, {m: dict(o) for m, o in spec.method_options.items()}
    from ..engine.config import load_yaml

    data = load_yaml(spec.config_file)
    section = data.pop("method_options", None) or {}
    if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
        raise ConfigError(f"{spec.config_file}: method_options must map METHOD to {{KEY: VALUE}}, got {section!r}")
    unknown = sorted(set(section) - set(spec.methods))
    if unknown:
        log.info("%s: method_options for %s ignored (not in --methods)", spec.config_file, ", ".join(unknown))
    items = [f"{m}:{k}={json.dumps(v)}" for m, opts in section.items() if m in spec.methods for k, v in opts.items()]
    per_method = parse_method_options(items, spec.methods)
    for m, opts in spec.method_options.items():
        per_method[m] = {**per_method.get(m, {}), **opts}
    return data, per_method


def _teacher_config(spec: CompareSpec, common: dict[str, Any]) -> Config:
    """The baseline teacher's config: the comparison's data and optimisation settings, seed 0."""
    layer = {"method": "baseline", "model": spec.teacher_model, "seed": 0, "progress": "none"}
    if spec.teacher_epochs is not None:
        layer["epochs"] = spec.teacher_epochs
    cfg = resolve_config(file_layers(spec)[0], common, layer)
    key = {k: v for k, v in flatten(cfg.to_dict()).items() if k.split(".", 1)[0] not in IGNORED_KEYS}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    cfg.out_dir = str(spec.out / "teachers")
    cfg.name = f"{cfg.dataset}-{spec.teacher_model}-{digest}"
    return cfg


def plan(spec: CompareSpec) -> tuple[Task | None, list[Task]]:
    """Resolve and validate every run's config, decide what to do with each folder (no training).

    Raises ConfigError for bad options, a missing teacher, or runs stored with other settings.
    """
    if spec.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {spec.workers}")
    if spec.threads is not None and spec.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {spec.threads}")
    common = nest(dict(spec.common))
    for key, hint in RESERVED_COMMON.items():
        if key in common:
            raise ConfigError(f"{key}= cannot be a common option of a comparison: {hint}")
    teacher_path = common.pop("teacher", None)
    # a teacher from outside fusionkd (teacher_model=NAME teacher_weights=FILE) goes to the offline runs only, and
    # so does the teacher check's threshold (whichever the teacher; it is not a teacher of its own)
    outside = {k: common.pop(k) for k in ("teacher_model", "teacher_weights") if k in common}
    teacher_check = {k: common.pop(k) for k in ("teacher_min_accuracy",) if k in common}
    if outside.get("teacher_weights"):
        outside["teacher_weights"] = str(Path(outside["teacher_weights"]).resolve())
    offline = [m for m in spec.methods if METHODS.get(m).needs_teacher]
    if sum(bool(x) for x in (teacher_path, spec.teacher_model, outside)) > 1:
        raise ConfigError("give one teacher, not both: teacher=PATH, --teacher-model NAME (trained here first), or "
                          "teacher_model=NAME teacher_weights=FILE (from outside fusionkd)")
    if offline and not (teacher_path or spec.teacher_model or outside):
        raise ConfigError(
            f"offline method(s) {', '.join(offline)} distil from a pre-trained teacher: pass teacher=PATH (a "
            "best.pt of `fusionkd train --method baseline ...`), --teacher-model NAME to train one first, or "
            "teacher_model=NAME teacher_weights=FILE for a teacher from outside fusionkd"
        )
    if teacher_path and not Path(teacher_path).is_file():
        raise ConfigError(f"teacher={teacher_path!r} does not exist")
    if spec.teacher_model:
        try:
            MODELS.entry(spec.teacher_model)
        except UnknownNameError as e:
            raise ConfigError(f"--teacher-model: {e}") from None
    if spec.devices:
        for dev in spec.devices:
            ok = dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
            if not ok:
                raise ConfigError(f"--devices: {dev!r} is not a device (expected cpu, cuda or cuda:N)")

    teacher_task = None
    if spec.teacher_model and offline:
        tcfg = _teacher_config(spec, common)
        teacher_task = Task(f"[teacher] baseline {spec.teacher_model} seed 0", tcfg, "baseline",
                            spec.teacher_model, 0, is_teacher=True)
        teacher_path = str((tcfg.run_dir / "best.pt").resolve())

    tasks: list[Task] = []
    from_file, per_method = file_layers(spec)
    runs_dir = spec.out / "runs"
    grid = [(model, method, seed) for model in spec.models for method in spec.methods for seed in spec.seeds]
    for i, (model, method, seed) in enumerate(grid, 1):
        needs = METHODS.get(method).needs_teacher
        layer: dict[str, Any] = {"method": method, "model": model, "seed": seed, "progress": "none",
                                 "out_dir": str(runs_dir), "name": f"{model}/{method}/s{seed}"}
        if needs:
            layer["teacher"] = str(Path(teacher_path).resolve()) if teacher_path else None
            layer.update(outside)
            layer.update(teacher_check)
        cfg = resolve_config(from_file, common, per_method.get(method, {}), layer)
        label = f"[{i}/{len(grid)}] {method} {model} seed {seed}"
        tasks.append(Task(label, cfg, method, model, seed, index=i, needs_teacher=needs))

    problems = [p for t in ([teacher_task] if teacher_task else []) + tasks
                if (p := _decide(t, spec.rerun_changed)) is not None]
    if problems:
        raise ConfigError(
            "these run folders were made with other settings than requested now, so they cannot be "
            "reused:\n  "
            + "\n  ".join(problems)
            + "\nChoose another --out, delete those folders, or pass --rerun-changed to replace them"
        )
    return teacher_task, tasks


# ---------------------------------------------------------------------- running
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

    def __init__(self, spec: CompareSpec, report: Report, total_runs: int) -> None:
        self.spec = spec
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
                res = execute(t.config.to_dict(), t.action, self.threads, self.slot_devices[0], progress="auto")
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


def lock_output(out: Path, wait: bool = False, report: Report | None = None, poll_s: float = 2.0) -> RunLock:
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
    runner = GridRunner(spec, say, len(tasks))
    runner.run(teacher, tasks)
    records = [load_run(t.run_dir) for t in tasks if (t.run_dir / "summary.json").is_file()]
    files = write_report(records, spec.out, title=spec.title, command=spec.command, failures=runner.failures)
    return CompareResult(spec.out, tasks, runner.failures, files)
