"""The plan of a comparison grid (:func:`plan`): the ``fusionkd compare`` arguments parsed and checked, every
run's config resolved (the config file, its ``method_options``, the common and per-method options), the
baseline teacher's config, and what to do with each run folder: keep a finished run, resume an interrupted
one, train a new one, or refuse a folder made with other settings (:func:`config_differences`).
Nothing is trained here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..engine.config import Config, ConfigError, nest, parse_override, resolve_config
from ..engine.flatten import flatten
from ..methods import METHODS
from ..models import MODELS
from ..registry import UnknownNameError

if TYPE_CHECKING:
    from .grid import CompareSpec

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


#: what may follow ``@`` in a method variant (``kd@ls``): it names a folder
_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


def method_of(label: str) -> str:
    """The registered method of a grid row: ``"kd@ls"`` -> ``"kd"``, ``"kd"`` -> ``"kd"``."""
    return label.split("@", 1)[0]


def parse_names(text: str | Sequence[str], kind: str) -> list[str]:
    """Comma-separated registered names (``kind`` = "method" or "model"), checked, duplicates removed.

    A method may carry a variant, ``METHOD@VARIANT`` (e.g. ``kd@ls``): a row of its own, with its own run
    folders (``OUT/runs/<model>/kd@ls/s<seed>``) and its own ``--method-options kd@ls:KEY=VALUE``.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not names:
        raise ConfigError(f"--{kind}s: give at least one {kind} name")
    registry = METHODS if kind == "method" else MODELS
    for n in names:
        base, at, variant = n.partition("@") if kind == "method" else (n, "", "")
        if at and not _VARIANT.match(variant):
            raise ConfigError(f"--{kind}s: {n!r}: a variant after '@' must be 1-40 letters, digits, '_', '.' or "
                              "'-', starting with a letter or digit (e.g. kd@ls)")
        try:
            registry.entry(base)
        except UnknownNameError as e:
            raise ConfigError(f"--{kind}s: {e}") from None
    return names


def parse_method_options(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["ffl:peers=3", "ffl:lr=0.05"]`` -> ``{"ffl": {"options.peers": 3, "lr": 0.05}}``.

    ``METHOD`` is a row of ``--methods`` as written there, a variant (``kd@ls:logit_std=true``) included.
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
        cls = METHODS.get(method_of(method))
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
    several = {k: common.pop(k) for k in ("teachers", "teacher_mix") if k in common}  # offline runs only, too
    if outside.get("teacher_weights"):
        outside["teacher_weights"] = str(Path(outside["teacher_weights"]).resolve())
    offline = [m for m in spec.methods if METHODS.get(method_of(m)).needs_teacher]
    if sum(bool(x) for x in (teacher_path, spec.teacher_model, outside, several.get("teachers"))) > 1:
        raise ConfigError("give one teacher, not both: teacher=PATH, --teacher-model NAME (trained here first), "
                          "teacher_model=NAME teacher_weights=FILE (from outside fusionkd), or teachers=[...]")
    if offline and not (teacher_path or spec.teacher_model or outside or several.get("teachers")):
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
        needs = METHODS.get(method_of(method)).needs_teacher
        layer: dict[str, Any] = {"method": method_of(method), "model": model, "seed": seed, "progress": "none",
                                 "out_dir": str(runs_dir), "name": f"{model}/{method}/s{seed}"}
        if needs:
            layer["teacher"] = str(Path(teacher_path).resolve()) if teacher_path else None
            layer.update(outside)
            layer.update(several)
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
