"""What a finished study gives: the best settings (``best.yaml`` for ``fusionkd train``, ``best-compare.yaml``
for ``fusionkd compare``), ``--confirm-seeds``' confirmation through ``compare`` (best settings, the method's
defaults and the baseline on several seeds) and the study's report ``tune.md``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import Config, ConfigError, deep_merge, load_yaml, nest, resolve_config
from .study import Report, TuneSpec, base_layers, format_params


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
    from ..engine.checkpoint import atomic_write_text

    b = best_settings(spec, study)
    base = base_layers(spec)
    note = (f"# fusionkd tune: best of study {spec.study_name!r} ({spec.storage}): trial {b['trial']}, "
            f"validation accuracy {b['val']:.2f} % (deploy head, best epoch)\n")
    train_cfg = deep_merge(deep_merge(base, {"method": spec.method}), nest(b["values"]))
    from ..compare.grid import RESERVED_COMMON

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
    from ..compare.aggregate import find_runs, load_run
    from ..compare.grid import RESERVED_COMMON, CompareSpec, compare
    from ..compare.stats import compare_groups

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
    study_seed = int(base_layers(spec).get("seed", Config.seed))
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
    return str(base_layers(spec).get("model", Config.model))


def _ms(values: dict[int, float]) -> str:
    v = list(values.values())
    if not v:
        return "-"
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f} ± -"


def write_markdown(spec: TuneSpec, study, confirmation: dict[str, Any] | None) -> Path:
    """``OUT/tune.md``: the command, the space, every trial, the best settings and the confirmation."""
    from ..engine.checkpoint import atomic_write_text

    b = best_settings(spec, study)
    md = [f"# Study `{spec.study_name}`: {spec.method}", ""]
    if spec.command:
        md += ["```bash", spec.command, "```", ""]
    md += [f"Storage `{spec.storage}`; sampler {spec.sampler}, pruner {spec.pruner}; score: the deploy head's best "
           "validation accuracy of each trial (the test split is never read during the study).", "",
           "Search space: " + ", ".join(f"`{p.describe()}`" for p in spec.space), "",
           trials_table(study), "",
           f"**Best**: trial {b['trial']}, validation {b['val']:.2f} %: `{format_params(b['values'])}` "
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
