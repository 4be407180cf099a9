"""``fusionkd tune``: hyper-parameter search with Optuna, scored only on validation accuracy.

A **study** tunes one method's options and any common config keys. Each **trial** is one ``fusionkd train``
run (folder ``OUT/trials/trial-NNNN``) whose score is the deploy head's best *validation* accuracy (the
``best.pt`` epoch); every evaluated epoch reports its validation accuracy to the pruner (median rule or
successive halving), which may stop the trial early. The test split is never read by a trial: the trainer
runs with ``use_test=False``, so the dataset is loaded without it (Fashion-MNIST's test files are not even
opened) and nothing is evaluated on it.

The study lives in an Optuna storage (``sqlite:///study.db``): a killed study resumes where it stopped (the
trial that was running when its process died is marked failed and its parameters are queued again), and
several processes running the same command share the work. At the end ``OUT/best.yaml`` (for ``fusionkd
train --config``) and ``OUT/best-compare.yaml`` (for ``fusionkd compare --config``) hold the best settings,
and ``--confirm-seeds`` trains the best settings, the method's defaults and the baseline on several seeds
(through ``compare``) and writes ``OUT/tune.md``. Optuna is the ``tune`` extra (``pip install
'fusionkd[tune]'``). See docs/tune.md.

A study folder is deliberately *not* locked as a whole (several processes may share one study); each trial's
run folder is locked by the trainer, and the confirmation's ``compare`` output folders are locked by
:func:`~fusionkd.compare.grid.compare`: a second worker reaching the confirmation waits for the first one's
``compare`` to finish and then finds its runs finished (kept, not retrained).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine.config import Config, ConfigError, deep_merge, load_yaml, nest, parse_override, resolve_config
from .engine.trackers import Callback, deferred_stops

log = logging.getLogger("fusionkd")

KINDS = ("uniform", "loguniform", "int", "logint", "choice")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
#: config keys a study may not tune: they belong to the study or to each trial, or they change what the score
#: measures (the validation split)
RESERVED = ("method", "seed", "name", "out_dir", "progress", "val_fraction", "data_seed", "dataset")
#: settings a study may not have (``--method`` names the method; each trial sets its own folder)
NOT_SETTINGS = ("method", "name", "out_dir")

Report = Callable[[str], None]
#: a study stops after this many failed trials in a row (e.g. every sampled lr makes the loss NaN)
MAX_FAILURES_IN_A_ROW = 3


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise ConfigError("fusionkd tune needs Optuna: pip install 'fusionkd[tune]' (or pip install optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ---------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config key (dotted, e.g. ``options.alpha``) and its distribution."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.kind == "logint")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform", step=self.step)

    def extremes(self) -> list[Any]:
        """Values every trial's config must accept (checked before the study starts)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind in ("int", "logint"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(map(str, self.choices))}"
        step = f":{self.step:g}" if self.step else ""
        return f"{self.key}={self.kind}:{self.low:g}:{self.high:g}{step}"


def _config_key(method: str, name: str, where: str) -> str:
    """``alpha`` -> ``options.alpha`` when it is an option of ``method``; a config key stays as it is."""
    from .methods import METHODS

    cls = METHODS.get(method)
    option_names = {f.name for f in dataclasses.fields(cls.Options)} if dataclasses.is_dataclass(cls.Options) else set()
    config_fields = {f.name for f in dataclasses.fields(Config)}
    if name.startswith("options."):
        name = name[len("options."):]
    if name in option_names:
        return f"options.{name}"
    top = name.split(".", 1)[0]
    if top in RESERVED:
        raise ConfigError(f"{where}: {top!r} cannot be tuned (it is fixed by the study or each trial)")
    if top not in config_fields:
        raise ConfigError(f"{where}: {name!r} is neither an option of {method!r} "
                          f"({', '.join(sorted(option_names)) or 'it has none'}) nor a config option (docs/config.md)")
    return name


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {text!r} is not a finite number")
    return v


def parse_distribution(key: str, spec: str | dict[str, Any], where: str) -> Param:
    """``"loguniform:0.5:4"``, ``"int:10:200"``, ``"int:10:200:10"``, ``"uniform:0:1"``, ``"choice:a,b"`` (or
    the same as a mapping ``{type: loguniform, low: 0.5, high: 4}``) -> :class:`Param`."""
    if isinstance(spec, dict):
        kind = str(spec.get("type", ""))
        step = [str(spec["step"])] if "step" in spec else []
        parts = [kind] + ([",".join(map(str, spec.get("choices") or []))] if kind == "choice" else
                          [str(spec.get("low")), str(spec.get("high")), *step])
    else:
        parts = str(spec).split(":")
        kind = parts[0]
    accepted = "uniform:LOW:HIGH[:STEP], loguniform:LOW:HIGH, int:LOW:HIGH[:STEP], logint:LOW:HIGH, choice:A,B,..."
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; accepted: {accepted}")
    if kind == "choice":
        if len(parts) != 2 or not parts[1].strip():
            raise ConfigError(f"{where}: choice needs its values, e.g. choice:0.05,0.1 ({accepted})")
        from .engine.config import read_value

        choices = tuple(read_value(c.strip()) for c in parts[1].split(",") if c.strip())
        return Param(key, "choice", choices=choices)
    if len(parts) not in (3, 4) or (len(parts) == 4 and kind in ("loguniform", "logint")):
        raise ConfigError(f"{where}: {':'.join(parts)!r} does not match {accepted}")
    low, high = _number(parts[1], where), _number(parts[2], where)
    step = _number(parts[3], where) if len(parts) == 4 else None
    if not low < high:
        raise ConfigError(f"{where}: LOW must be below HIGH, got {low:g} and {high:g}")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"{where}: a log distribution needs LOW > 0, got {low:g}")
    if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: int bounds must be integers, got {low:g} and {high:g}")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: STEP must be positive, got {step:g}")
    return Param(key, kind, low, high, step)


def parse_space(items: Sequence[str], method: str, space_file: str | None = None) -> list[Param]:
    """Command-line items ``[METHOD:]KEY=DIST`` and/or a YAML file ``{"[METHOD:]KEY": DIST, ...}``."""
    entries: list[tuple[str, Any, str]] = []
    if space_file:
        data = load_yaml(space_file)
        data = data.get("space", data)
        if not isinstance(data, dict):
            raise ConfigError(f"{space_file}: expected a mapping of KEY: DISTRIBUTION")
        entries += [(str(k), v, f"{space_file}: {k}") for k, v in data.items()]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--space {item!r}: expected [METHOD:]KEY=DISTRIBUTION, "
                              "e.g. frskd:alpha=loguniform:0.5:4")
        k, v = item.split("=", 1)
        entries.append((k.strip(), v.strip(), f"--space {item!r}"))
    params: dict[str, Param] = {}
    for raw_key, dist, where in entries:
        name = raw_key
        if ":" in raw_key:
            prefix, name = raw_key.split(":", 1)
            if prefix != method:
                raise ConfigError(f"{where}: it is for method {prefix!r}, but this study tunes {method!r}")
        key = _config_key(method, name.strip(), where)
        if key in params:
            raise ConfigError(f"{where}: {key!r} is given twice in the search space")
        params[key] = parse_distribution(key, dist, where)
    if not params:
        raise ConfigError("the search space is empty: give --space KEY=DIST ... or --space-file FILE")
    return list(params.values())


# ---------------------------------------------------------------------- the study
@dataclass
class TuneSpec:
    """The arguments of ``fusionkd tune``."""

    method: str
    space: list[Param]
    out: Path
    trials: int = 20
    storage: str | None = None  #: Optuna storage URL; default ``sqlite:///OUT/study.db``
    study_name: str | None = None  #: default: the out folder's name
    sampler: str = "tpe"
    pruner: str = "median"
    sampler_seed: int | None = 0
    prune_startup: int = 3  #: median: trials that are never pruned; halving: unused
    prune_warmup: int = 1  #: a trial may be pruned from this epoch on (Optuna's n_warmup_steps; epochs from 1)
    common: dict[str, Any] = field(default_factory=dict)  #: key=value settings of every trial
    config_file: str | None = None
    confirm_seeds: list[int] = field(default_factory=list)
    #: settings of the confirmation runs only (e.g. ``eval_every``: the study prunes per epoch, the
    #: confirmation may evaluate less often); they apply to all three arms alike
    confirm_options: dict[str, Any] = field(default_factory=dict)
    confirm_workers: int = 1
    command: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.storage is None:
            self.storage = f"sqlite:///{(self.out / 'study.db').resolve()}"
        if self.study_name is None:
            self.study_name = self.out.resolve().name


def _base_layers(spec: TuneSpec) -> dict[str, Any]:
    file_layer = load_yaml(spec.config_file) if spec.config_file else {}
    return deep_merge(file_layer, nest(dict(spec.common)))


def check_spec(spec: TuneSpec) -> Config:
    """Everything a study needs, checked before anything is created: the method, the settings, every end
    of every distribution, a validation split. Returns the config of the space's first corner."""
    if spec.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {spec.trials}")
    for name, value, accepted in (("--sampler", spec.sampler, SAMPLERS), ("--pruner", spec.pruner, PRUNERS)):
        if value not in accepted:
            raise ConfigError(f"{name} {value!r} is not accepted; choose one of: {', '.join(accepted)}")
    base = _base_layers(spec)
    for key in NOT_SETTINGS:
        if key in base:
            raise ConfigError(f"{key}= cannot be a setting of a study (--method names the method, --out the folder)")
    cfg = resolve_config(base, {"method": spec.method})  # the settings alone first: their own message
    for p in spec.space:
        for value in p.extremes():
            try:
                cfg = resolve_config(base, {"method": spec.method}, nest({p.key: value}))
            except ConfigError as e:
                raise ConfigError(f"search space {p.describe()}: the value {value!r} is refused: {e}") from None
    if cfg.val_fraction <= 0:
        raise ConfigError("a study chooses on the validation split: val_fraction must be > 0 (it is "
                          f"{cfg.val_fraction:g}); the test split is never used for choosing")
    return cfg


class PruningCallback(Callback):
    """Reports each evaluated epoch's deploy-head validation accuracy to the trial; raises ``TrialPruned``
    when the pruner says so (the trainer's ``last.pt`` of that epoch is already written)."""

    def __init__(self, trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        val = (metrics.get("val") or {}).get(metrics.get("deploy_head"))
        if val is None:
            return
        with deferred_stops():  # a Ctrl-C/SIGTERM during the storage write takes effect after it
            self.trial.report(float(val), int(metrics["epoch"]))
            prune = self.trial.should_prune()
        if prune:
            self.pruned_at = int(metrics["epoch"])
            with deferred_stops():
                self.trial.set_user_attr("pruned_at_epoch", self.pruned_at)
                self.trial.set_user_attr("last_val", float(val))
            raise _optuna().TrialPruned(f"pruned at epoch {self.pruned_at} (val {val:.2f})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study, report: Report) -> int:
    """Trials left RUNNING by a process of this host that no longer exists: mark them failed and queue their
    parameters again. Returns how many were re-queued. (Trials of live processes, e.g. a second worker, and
    of other hosts are left alone.)"""
    optuna = _optuna()
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"process {pid} died while training it")
            study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process of this study recovered it first
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        report(f"trial {t.number} was interrupted (process {pid} is gone): marked failed, its parameters queued again")
        n += 1
    return n


def _sampler(spec: TuneSpec):
    optuna = _optuna()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    return optuna.samplers.TPESampler(seed=spec.sampler_seed, n_startup_trials=min(5, max(1, spec.trials // 3)))


def _pruner(spec: TuneSpec):
    optuna = _optuna()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup, n_warmup_steps=spec.prune_warmup)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.prune_warmup), reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(spec: TuneSpec):
    optuna = _optuna()
    spec.out.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(study_name=spec.study_name, storage=spec.storage, load_if_exists=True,
                                    direction="maximize", sampler=_sampler(spec), pruner=_pruner(spec))
    except Exception as e:  # noqa: BLE001 - a storage that cannot be opened is a refusal, named
        raise ConfigError(f"--storage {spec.storage!r} cannot be opened: {type(e).__name__}: {e}") from e
    stored = study.user_attrs.get("fusionkd")
    mine = {"method": spec.method, "space": [p.describe() for p in spec.space],
            "common": _base_layers(spec)}
    if stored is None:
        study.set_user_attr("fusionkd", json.loads(json.dumps(mine, default=str)))
    elif json.loads(json.dumps(mine, default=str)) != stored:
        raise ConfigError(
            f"study {spec.study_name!r} in {spec.storage} was started with other settings "
            f"({json.dumps(stored)[:300]}); resume it with the same command, or choose another --study-name/--out")
    return study


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k.removeprefix('options.')}={v:.4g}" if isinstance(v, float) else
                    f"{k.removeprefix('options.')}={v}" for k, v in params.items())


def _counted(study) -> int:
    optuna = _optuna()
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED)))


def run_study(spec: TuneSpec, report: Report | None = None):
    """Run (or resume, or join) the study until it holds ``spec.trials`` finished (complete or pruned) trials."""
    say = report or (lambda s: log.info("%s", s))
    check_spec(spec)
    optuna = _optuna()
    from .engine.trainer import NonFiniteLossError, Trainer

    study = open_study(spec)
    recover_interrupted(study, say)
    base = _base_layers(spec)
    done = _counted(study)
    if done >= spec.trials:
        say(f"study {spec.study_name!r} already holds {done} finished trial(s) (asked: {spec.trials})")
    else:
        say(f"study {spec.study_name!r} ({spec.storage}): {done} of {spec.trials} trials done; tuning "
            f"{spec.method}: {', '.join(p.describe() for p in spec.space)}; sampler {spec.sampler}, pruner "
            f"{spec.pruner}; score = deploy head's best validation accuracy (test split never read)")

    def objective(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        values = {p.key: p.suggest(trial) for p in spec.space}
        run_dir = spec.out / "trials" / f"trial-{trial.number:04d}"
        layer = {"method": spec.method, "out_dir": str(spec.out / "trials"), "name": run_dir.name,
                 "progress": "none"}
        try:
            cfg = resolve_config(base, nest(values), layer)
        except ConfigError as e:  # a combination of values the config refuses (each end alone was checked)
            trial.set_user_attr("error", f"ConfigError: {e}")
            raise
        trainer = Trainer(cfg, run_dir, overwrite=True)
        trainer.use_test = False
        pruning = PruningCallback(trial)
        trainer.callbacks.append(pruning)
        trial.set_user_attr("run_dir", str(run_dir))
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except (NonFiniteLossError, ConfigError) as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            raise
        best = result.summary["best"]
        head = result.summary["deploy_head"]
        trial.set_user_attr("best_epoch", best["epoch"])
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return float(best["val"][head])

    failures: list[str] = []

    def progress(study, t) -> None:
        total = _counted(study)
        if t.state.name == "FAIL":
            failures.append(str(t.user_attrs.get("error", "failed")))
            if len(failures) >= MAX_FAILURES_IN_A_ROW:
                study.stop()
        else:
            failures.clear()
        params = _fmt_params(t.params)
        state = t.state.name.lower()
        if state == "complete":
            what = f"val {t.value:.2f} (best epoch {t.user_attrs.get('best_epoch')})"
        elif state == "pruned":
            what = f"pruned at epoch {t.user_attrs.get('pruned_at_epoch')} (val {t.user_attrs.get('last_val', 0):.2f})"
        else:
            what = f"{state}: {failures[-1] if failures else ''}"
        try:
            b = study.best_trial
            best = f"best so far: trial {b.number}, val {b.value:.2f}"
        except ValueError:
            best = "no complete trial yet"
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
        say(f"trial {t.number} [{total}/{spec.trials}] {params} -> {what} | {best} | {secs:.0f}s")

    if done < spec.trials:
        study.optimize(objective, n_trials=None, catch=(NonFiniteLossError, ConfigError),
                       callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=(
                           optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)), progress])
        if len(failures) >= MAX_FAILURES_IN_A_ROW:
            raise ConfigError(f"{len(failures)} trials in a row failed, the study stops (it resumes with the same "
                              f"command once the cause is fixed); the last: {failures[-1]}")
    return study


# ---------------------------------------------------------------------- results
def best_settings(spec: TuneSpec, study) -> dict[str, Any]:
    """The settings of the best complete trial: the study's common settings plus the tuned values."""
    try:
        best = study.best_trial
    except ValueError:
        raise ConfigError(f"study {spec.study_name!r} has no complete trial (all pruned or failed); nothing to "
                          "write") from None
    return {"trial": best.number, "val": best.value, "values": dict(best.params)}


def write_best(spec: TuneSpec, study) -> dict[str, Path]:
    """``OUT/best.yaml`` (``fusionkd train --config``) and ``OUT/best-compare.yaml`` (``fusionkd compare
    --config``: the common settings, and the tuned values under ``method_options`` for the method only)."""
    from .engine.checkpoint import atomic_write_text

    b = best_settings(spec, study)
    base = _base_layers(spec)
    note = (f"# fusionkd tune: best of study {spec.study_name!r} ({spec.storage}): trial {b['trial']}, "
            f"validation accuracy {b['val']:.2f} % (deploy head, best epoch)\n")
    train_cfg = deep_merge(deep_merge(base, {"method": spec.method}), nest(b["values"]))
    from .compare.grid import RESERVED_COMMON

    compare_cfg = {k: v for k, v in base.items() if k not in RESERVED_COMMON}
    dropped = {k: v for k, v in base.items() if k in RESERVED_COMMON}
    per_method: dict[str, Any] = {}
    for k, v in b["values"].items():
        per_method[k.removeprefix("options.")] = v
    compare_cfg["method_options"] = {spec.method: per_method}
    paths = {"train": spec.out / "best.yaml", "compare": spec.out / "best-compare.yaml"}
    atomic_write_text(note + yaml.safe_dump(train_cfg, sort_keys=False), paths["train"])
    dropped_note = ("# the study also set " + ", ".join(f"{k}={v}" for k, v in dropped.items())
                    + ": give them to compare as its own flags (--models, --threads, --devices)\n") if dropped else ""
    atomic_write_text(note + "# method_options apply to that method's runs only; the rest to every run\n" + dropped_note
                      + yaml.safe_dump(compare_cfg, sort_keys=False), paths["compare"])
    resolve_config(load_yaml(paths["train"]))  # what we wrote must be accepted as it is
    return paths


def trials_table(study) -> str:
    rows = ["| trial | state | " + " | ".join(k.removeprefix("options.") for k in _param_keys(study))
            + " | val % (best epoch) | epochs run |", "|---:|---|" + "---:|" * (len(_param_keys(study)) + 2)]
    for t in study.get_trials(deepcopy=False):
        vals = [f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-"))
                for k in _param_keys(study)]
        score = f"{t.value:.2f} ({t.user_attrs.get('best_epoch')})" if t.state.name == "COMPLETE" else (
            f"pruned (val {t.user_attrs['last_val']:.2f})" if "last_val" in t.user_attrs else "-")
        epochs = str(max(t.intermediate_values) if t.intermediate_values else 0)
        rows.append(f"| {t.number} | {t.state.name.lower()} | " + " | ".join(vals) + f" | {score} | {epochs} |")
    return "\n".join(rows)


def _param_keys(study) -> list[str]:
    keys: dict[str, None] = {}
    for t in study.get_trials(deepcopy=False):
        keys.update(dict.fromkeys(t.params))
    return list(keys)


# ---------------------------------------------------------------------- confirmation
def confirm(spec: TuneSpec, study, report: Report | None = None) -> dict[str, Any]:
    """Train the best settings, the method's defaults and the baseline on ``spec.confirm_seeds`` through
    ``fusionkd compare`` (``OUT/confirm``: baseline + tuned; ``OUT/confirm-defaults``: the method with its
    defaults), then compare the three arms by seed: validation for the choice, test reported."""
    from .compare.aggregate import find_runs, load_run
    from .compare.grid import RESERVED_COMMON, CompareSpec, compare
    from .compare.stats import compare_groups

    paths = write_best(spec, study)
    for key in spec.confirm_options:
        if key.split(".", 1)[0] in RESERVED_COMMON or key in {p.key for p in spec.space}:
            raise ConfigError(f"--confirm-options {key}: not a setting the confirmation may change (tuned, or "
                              "set by compare)")
    common = {k: v for k, v in {**spec.common, **spec.confirm_options}.items()
              if k.split(".", 1)[0] not in RESERVED_COMMON}
    threads = spec.common.get("threads")
    arms: dict[str, Path] = {}
    methods = ["baseline", spec.method] if spec.method != "baseline" else ["baseline"]
    tuned = CompareSpec(methods=methods, models=[_model(spec)], seeds=list(spec.confirm_seeds),
                        out=spec.out / "confirm", config_file=str(paths["compare"]),
                        common={k: v for k, v in spec.confirm_options.items()},
                        workers=spec.confirm_workers, threads=threads, title="Confirmation of the tuned settings",
                        command=(spec.command or "fusionkd tune") + "  # --confirm-seeds, tuned settings")
    compare(tuned, report=report, wait=True)  # another worker of the study may be confirming it
    defaults = CompareSpec(methods=[spec.method], models=[_model(spec)], seeds=list(spec.confirm_seeds),
                           out=spec.out / "confirm-defaults", common=common, config_file=spec.config_file,
                           workers=spec.confirm_workers, threads=threads,
                           title="Confirmation: the method's default settings",
                           command=(spec.command or "fusionkd tune") + "  # --confirm-seeds, defaults")
    compare(defaults, report=report, wait=True)  # another worker of the study may be confirming it
    arms = {"baseline": ("confirm", "baseline"), f"{spec.method} (defaults)": ("confirm-defaults", spec.method),
            f"{spec.method} (tuned)": ("confirm", spec.method)}
    if spec.method == "baseline":
        arms = {"baseline (defaults)": ("confirm-defaults", "baseline"), "baseline (tuned)": ("confirm", "baseline")}
    table: dict[str, dict[str, dict[int, float]]] = {}
    for arm, (folder, method) in arms.items():
        recs = [load_run(p) for p in find_runs([spec.out / folder])]
        recs = [r for r in recs if r.summary.get("method") == method]
        by = {"val": {}, "test_best": {}, "test_last": {}}
        for r in recs:
            head = r.summary["deploy_head"]
            by["val"][r.seed] = r.summary["best"]["val"][head]
            by["test_best"][r.seed] = r.summary["best"]["test"][head]
            by["test_last"][r.seed] = r.summary["last"]["test"][head]
        table[arm] = by
    names = list(arms)
    study_seed = int(_base_layers(spec).get("seed", Config.seed))
    fresh = [s for s in spec.confirm_seeds if s != study_seed]
    pairs = [(names[-1], names[-2])] + ([(names[-1], names[0]), (names[1], names[0])] if len(names) == 3 else [])
    verdicts: dict[str, dict[str, Any]] = {}
    for label, seeds in [("", list(spec.confirm_seeds))] + (
            [(f" (fresh seeds {', '.join(map(str, fresh))} only)", fresh)]
            if study_seed in spec.confirm_seeds and len(fresh) >= 2 else []):
        for a, b in pairs:
            pick = lambda arm, m, keep=seeds: {k: v for k, v in table[arm][m].items() if k in keep}  # noqa: E731
            verdicts[f"{a} vs {b}{label}"] = {m: compare_groups(pick(a, m), pick(b, m))
                                              for m in ("val", "test_best", "test_last")}
    return {"arms": table, "verdicts": verdicts, "best": best_settings(spec, study), "files": paths,
            "study_seed": study_seed}


def _model(spec: TuneSpec) -> str:
    return str(_base_layers(spec).get("model", Config.model))


def _ms(values: dict[int, float]) -> str:
    v = list(values.values())
    if not v:
        return "-"
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f} ± -"


def write_markdown(spec: TuneSpec, study, confirmation: dict[str, Any] | None) -> Path:
    """``OUT/tune.md``: the command, the space, every trial, the best settings and the confirmation."""
    from .engine.checkpoint import atomic_write_text

    b = best_settings(spec, study)
    md = [f"# Study `{spec.study_name}`: {spec.method}", ""]
    if spec.command:
        md += ["```bash", spec.command, "```", ""]
    md += [f"Storage `{spec.storage}`; sampler {spec.sampler}, pruner {spec.pruner}; score: the deploy head's best "
           "validation accuracy of each trial (the test split is never read during the study).", "",
           "Search space: " + ", ".join(f"`{p.describe()}`" for p in spec.space), "",
           trials_table(study), "",
           f"**Best**: trial {b['trial']}, validation {b['val']:.2f} %: `{_fmt_params(b['values'])}` "
           "(written to `best.yaml` and `best-compare.yaml`).", ""]
    if confirmation:
        seeds = ", ".join(map(str, spec.confirm_seeds))
        md += [f"## Confirmation on seeds {seeds}", "",
               "Deploy head, %, mean ± std over seeds. *val* is what a choice may use; *test* is reported only.",
               "", "| arm | val (best epoch) | test at best-val | test last |", "|---|---:|---:|---:|"]
        for arm, by in confirmation["arms"].items():
            md.append(f"| {arm} | {_ms(by['val'])} | {_ms(by['test_best'])} | {_ms(by['test_last'])} |")
        md += ["", "Differences (95 % interval, paired by seed; gain/loss only when it excludes zero):", ""]
        if confirmation.get("study_seed") in spec.confirm_seeds:
            md += [f"Seed {confirmation['study_seed']} is the seed every trial trained with, so its tuned run repeats "
                   "the best trial (chosen for its validation accuracy on that seed): the rows over the fresh seeds "
                   "only are the unbiased ones. Confirm on seeds the study did not use (e.g. `--confirm-seeds "
                   "1,2,3`) to avoid it.", ""]
        for pair, v in confirmation["verdicts"].items():
            parts = [f"{m}: {x.format()}" for m, x in v.items() if x is not None]
            md.append(f"- {pair}: " + "; ".join(parts))
        md += ["", "Per-run reports: `confirm/report.md`, `confirm-defaults/report.md`.", ""]
    path = spec.out / "tune.md"
    atomic_write_text("\n".join(md), path)
    return path


def parse_common(items: Sequence[str]) -> dict[str, Any]:
    return dict(parse_override(o) for o in items)
