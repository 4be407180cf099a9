"""A study of ``fusionkd tune``: its arguments (:class:`TuneSpec`) checked before anything is created, the
Optuna study opened (or resumed, or joined) in its storage, interrupted trials recovered, and the trials run
(each one ``fusionkd train`` run scored on validation, pruned per epoch by :class:`PruningCallback`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import Config, ConfigError, deep_merge, load_yaml, nest, resolve_config
from ..engine.trackers import Callback, deferred_stops
from .space import Param

log = logging.getLogger("fusionkd")

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
#: settings a study may not have (``--method`` names the method; each trial sets its own folder)
NOT_SETTINGS = ("method", "name", "out_dir")

Report = Callable[[str], None]
#: a study stops after this many failed trials in a row (e.g. every sampled lr makes the loss NaN)
MAX_FAILURES_IN_A_ROW = 3


def optuna_module():
    """The ``optuna`` module (quiet), or a ConfigError that says how to install it."""
    try:
        import optuna
    except ImportError as e:
        raise ConfigError("fusionkd tune needs Optuna: pip install 'fusionkd[tune]' (or pip install optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


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


def base_layers(spec: TuneSpec) -> dict[str, Any]:
    """The study's settings: its config file (if any) under its ``key=value`` settings."""
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
    base = base_layers(spec)
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
            raise optuna_module().TrialPruned(f"pruned at epoch {self.pruned_at} (val {val:.2f})")


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
    optuna = optuna_module()
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
    optuna = optuna_module()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    return optuna.samplers.TPESampler(seed=spec.sampler_seed, n_startup_trials=min(5, max(1, spec.trials // 3)))


def _pruner(spec: TuneSpec):
    optuna = optuna_module()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup, n_warmup_steps=spec.prune_warmup)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.prune_warmup), reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(spec: TuneSpec):
    optuna = optuna_module()
    spec.out.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(study_name=spec.study_name, storage=spec.storage, load_if_exists=True,
                                    direction="maximize", sampler=_sampler(spec), pruner=_pruner(spec))
    except Exception as e:  # noqa: BLE001 - a storage that cannot be opened is a refusal, named
        raise ConfigError(f"--storage {spec.storage!r} cannot be opened: {type(e).__name__}: {e}") from e
    stored = study.user_attrs.get("fusionkd")
    mine = {"method": spec.method, "space": [p.describe() for p in spec.space],
            "common": base_layers(spec)}
    if stored is None:
        study.set_user_attr("fusionkd", json.loads(json.dumps(mine, default=str)))
    elif json.loads(json.dumps(mine, default=str)) != stored:
        raise ConfigError(
            f"study {spec.study_name!r} in {spec.storage} was started with other settings "
            f"({json.dumps(stored)[:300]}); resume it with the same command, or choose another --study-name/--out")
    return study


def format_params(params: dict[str, Any]) -> str:
    """``{"options.alpha": 1.23456}`` -> ``"alpha=1.235"`` (a trial's values on one line)."""
    return " ".join(f"{k.removeprefix('options.')}={v:.4g}" if isinstance(v, float) else
                    f"{k.removeprefix('options.')}={v}" for k, v in params.items())


def _counted(study) -> int:
    optuna = optuna_module()
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED)))


def run_study(spec: TuneSpec, report: Report | None = None):
    """Run (or resume, or join) the study until it holds ``spec.trials`` finished (complete or pruned) trials."""
    say = report or (lambda s: log.info("%s", s))
    check_spec(spec)
    optuna = optuna_module()
    from ..engine.trainer import NonFiniteLossError, Trainer

    study = open_study(spec)
    recover_interrupted(study, say)
    base = base_layers(spec)
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
        params = format_params(t.params)
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

