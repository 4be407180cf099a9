"""Write a comparison's ``results.csv``, ``report.md`` and PNG plots from finished run folders.

``report.md`` has a table per (dataset, model) with, per method, mean ± std over seeds of the deploy
head's test accuracy at the last epoch and at the best-validation epoch, the same for the best auxiliary
head, the gain over ``baseline``, training time, throughput and extra parameters; then the settings, the
hardware and the date. Plots need matplotlib (the ``plots`` extra); without it the report says so.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.checkpoint import atomic_write_text
from .aggregate import (
    RUNTIME_KEYS,
    GroupStats,
    RunRecord,
    config_flats,
    find_runs,
    label_rows,
    load_run,
    rows_to_csv,
    run_rows,
)
from .aggregate import summarize as summarize_groups

log = logging.getLogger("fusionkd")

#: the settings named first in the report's settings section
KEY_SETTINGS = ("dataset", "subset", "val_fraction", "data_seed", "epochs", "batch_size", "optimizer", "lr",
                "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "precision",
                "channels_last", "augment.cutout")

DEFINITIONS = (
    "Accuracies are top-1 test accuracy (%) on the dataset's test split. **last**: after the final epoch "
    "(`last.pt`). **best-val**: at the epoch with the highest *validation* accuracy (never chosen on test); "
    "for the deploy head this is the engine's `best.pt` epoch (tested on `best.pt`'s weights); every other "
    "head is selected by its own validation accuracy when the runs tested every epoch (`eval_test=every`), "
    "else it is reported at the deploy head's best epoch (selection `deploy-val`). Values are mean ± sample "
    "std over seeds (ddof = 1; `-` for a single seed). "
    "**gain** is mean(method) − mean(baseline) for the same model with its 95 % confidence interval "
    "[lo, hi]: the paired t interval over the per-seed differences when both ran the same seeds, else "
    "Welch's; it reads *gain* or *loss* only when the interval excludes zero, *tie* otherwise, "
    "*unknown* with one seed, and *undetermined* when the seeds show no spread (every per-seed difference "
    "identical, or both groups constant: no interval can be estimated, so there is no evidence either way). "
    "The intervals, Welch's p-values and the reason for each missing interval are listed under each table. "
    "**best aux head**: among the heads that are never deployed, the one "
    "with the highest mean last-epoch test accuracy (e.g. a fused, ensemble or self-teacher classifier). "
    "**train time** is the mean training time per run (evaluation excluded); **img/s** is training "
    "throughput; **extra params** are the parameters trained or used beyond the deployed network."
)


@dataclass
class Failure:
    """A run of a comparison that did not finish (shown in the report, never in the tables)."""

    label: str
    run_dir: str
    error: str


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote."""

    csv: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    groups: list[GroupStats] = field(default_factory=list)
    plots_skipped: str | None = None


# ---------------------------------------------------------------------- formatting
def format_duration(seconds: float | None) -> str:
    """Seconds as ``42s``, ``3m05s`` or ``2h07m`` (``-`` for None): the tables' time per run."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


_time = format_duration  # its former name


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if abs(n) >= 1e6 else (f"{n / 1e3:.1f} k" if abs(n) >= 1e3 else str(n))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def results_table(groups: Sequence[GroupStats]) -> str:
    """The markdown table of one (dataset, model) group of methods."""
    head = ("| method | family | seeds | deploy head | test % last | test % best-val | gain last "
            "| gain best-val | best aux head | aux last | aux best-val | train time | img/s | extra params |")
    lines = [head, "|" + "---|" * 3 + "---|" + "---:|" * 4 + "---|" + "---:|" * 5]
    for g in groups:
        aux = g.aux_head or "-"
        gl = "(reference)" if g.method == "baseline" else (g.gain_last.format() if g.gain_last else "-")
        gb = "(reference)" if g.method == "baseline" else (g.gain_best.format() if g.gain_best else "-")
        aux_last = g.aux_last.format() if g.aux_head else "-"
        aux_best = g.aux_best.format() if g.aux_head else "-"
        img = "-" if g.img_per_s.mean is None else f"{g.img_per_s.mean:,.0f}"
        cells = [g.method, g.family, str(len(g.seeds)), ", ".join(g.deploy_heads), g.deploy_last.format(),
                 g.deploy_best.format(), gl, gb, aux, aux_last, aux_best, format_duration(g.train_time_s.mean), img,
                 _count(g.params_extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def significance_notes(groups: Sequence[GroupStats]) -> list[str]:
    """One line per method of a table: the test behind each gain cell (interval, df, p-values, or why there is
    no interval: one seed, or no spread between seeds)."""
    lines = []
    for g in groups:
        if g.method == "baseline" or (g.gain_last is None and g.gain_best is None):
            continue
        parts = [f"{label}: {v.format()} ({v.detail()})" for label, v in (("last", g.gain_last),
                                                                         ("best-val", g.gain_best)) if v]
        lines.append(f"- `{g.method}` vs `baseline`, " + " — ".join(parts))
    return lines


def by_table(groups: Sequence[GroupStats]) -> dict[tuple[str, str], list[GroupStats]]:
    """Groups split by (dataset, model), in report order."""
    out: dict[tuple[str, str], list[GroupStats]] = {}
    for g in groups:
        out.setdefault((g.dataset, g.model), []).append(g)
    return out


# ---------------------------------------------------------------------- sections
def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)


def settings_section(records: Sequence[RunRecord], teachers: dict[str, dict[str, Any]] | None = None) -> str:
    """The common config, what each method sets differently, data sizes, epochs, seeds and teachers."""
    lines = ["## Settings", ""]
    excluded = RUNTIME_KEYS | {"method", "model", "teacher"}
    configured = [r for r in records if r.config]
    flats = {id(r): {k: v for k, v in f.items() if k not in excluded}
             for r, f in zip(configured, config_flats([r.config for r in configured]), strict=True)}
    if flats:
        all_keys = sorted({k for f in flats.values() for k in f})
        enc = lambda f, k: json.dumps(f.get(k), sort_keys=True, default=str)  # noqa: E731
        common = [k for k in all_keys if len({enc(f, k) for f in flats.values()}) == 1]
        first = next(iter(flats.values()))
        key_facts = [k for k in KEY_SETTINGS if k in common]
        lines.append("Common to every run: " + ", ".join(f"`{k}={_value(first.get(k))}`" for k in key_facts)
                     + "; the full list of common settings is below.")
        lines += ["", "<details><summary>every common setting</summary>", "",
                  ", ".join(f"`{k}={_value(first.get(k))}`" for k in common), "", "</details>", "",
                  "Settings that differ between methods (the method's published recipe and its options):", ""]
        methods: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if id(r) in flats:
                methods.setdefault(r.label, []).append(flats[id(r)])
        for m, fs in methods.items():
            own = [k for k in all_keys if k not in common and len({enc(f, k) for f in fs}) == 1]
            varies = [k for k in all_keys if k not in common and k not in own]
            parts = [f"`{k}={_value(fs[0].get(k))}`" for k in own]
            text = f"- `{m}`: " + (", ".join(parts) if parts else "no other settings")
            if varies:
                text += f"; **differs between its runs**: {', '.join(f'`{k}`' for k in varies)}"
            lines.append(text)
        lines.append("")
    data = [r.summary["data"] for r in records if r.summary.get("data")]
    sizes = sorted({(d.get("train"), d.get("val"), d.get("test")) for d in data}, key=str)
    lines.append("Data (train / val / test images): "
                 + "; ".join(f"{a} / {b} / {c}" for a, b, c in sizes) + ".")
    epochs = sorted({r.summary.get("epochs") for r in records}, key=str)
    seeds = sorted({r.seed for r in records})
    lines.append(f"Epochs: {', '.join(str(e) for e in epochs)}. Seeds: {', '.join(str(s) for s in seeds)} "
                 "(`data_seed` fixes the validation split and subset for every seed).")
    for path, t in (teachers or {}).items():
        acc = t.get("test_accuracy")
        lines.append(f"Teacher of the offline methods: `{t.get('model', '?')}` from `{path}`"
                     + (f", test accuracy {acc:.2f} % (best-val epoch)." if acc is not None else "."))
    return "\n".join(lines)


def hardware_section(records: Sequence[RunRecord]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        h = r.summary.get("hardware") or {}
        gpu = f" ({h['gpu']})" if h.get("gpu") else ""
        text = (f"{h.get('cpu', '?')}; device {h.get('device', '?')}{gpu}; {h.get('threads', '?')} "
                f"thread(s); torch {h.get('torch', '?')}, python {h.get('python', '?')}, "
                f"fusionkd {h.get('fusionkd', '?')}")
        counts[text] = counts.get(text, 0) + 1
    lines = ["## Hardware", ""] + [f"- {t} ({n} run{'s' if n != 1 else ''})" for t, n in counts.items()]
    stamps = sorted((r.path / "summary.json").stat().st_mtime for r in records)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if stamps:
        fmt = lambda t: _dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M")  # noqa: E731
        lines += ["", f"Runs finished between {fmt(stamps[0])} and {fmt(stamps[-1])}; report written {now}."]
    return "\n".join(lines)


def teacher_info(records: Iterable[RunRecord]) -> dict[str, dict[str, Any]]:
    """The teachers named in the runs' configs, with the teacher run's summary when it is next to it."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        path = r.config.get("teacher")
        if not path or path in out:
            continue
        info: dict[str, Any] = {}
        summary = Path(path).parent / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            info = {"model": s.get("model"), "test_accuracy": ((s.get("best") or {}).get("test") or {}).get(
                s.get("deploy_head"))}
        out[str(path)] = info
    return out


# ---------------------------------------------------------------------- plots
def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _curve_split(records: Sequence[RunRecord]) -> str:
    """"test" when every run measured the test split at every validated epoch (``eval_test=every``, or no
    validation split), else "val": by default the test split is read once, at the end."""
    every = all(len(r.evaluated()) >= max(2, len(r.validated())) for r in records)
    return "test" if records and every else "val"


def _deploy_curve(rec: RunRecord, split: str = "test") -> dict[int, float]:
    head = rec.summary["deploy_head"]
    lines = rec.evaluated() if split == "test" else rec.validated()
    return {m["epoch"]: m[split][m.get("deploy_head", head)] for m in lines
            if m.get("deploy_head", head) in m[split]}


def write_plots(records: Sequence[RunRecord], groups: Sequence[GroupStats], out_dir: Path) -> list[Path]:
    """Per (dataset, model): accuracy curves (deploy head, mean over seeds, min–max band; validation accuracy
    unless every run tested every evaluated epoch, see :func:`_curve_split`) and a bar
    chart of the last-epoch deploy-head accuracy with ±std error bars. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written: list[Path] = []
    for (dataset, model), gs in by_table(groups).items():
        slug = _slug(f"{dataset}_{model}")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        split = _curve_split([r for r in records if r.key[:2] == (dataset, model)])
        split_name = {"test": "test", "val": "validation"}[split]
        for g in gs:
            curves = [_deploy_curve(r, split) for r in records if r.key == (dataset, model, g.method)]
            epochs = sorted({e for c in curves for e in c})
            if not epochs:
                continue
            vals = [[c[e] for c in curves if e in c] for e in epochs]
            mean = [sum(v) / len(v) for v in vals]
            line = ax.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, ms=3,
                           label=f"{g.method} (n={len(curves)})")[0]
            if len(curves) > 1:
                ax.fill_between(epochs, [min(v) for v in vals], [max(v) for v in vals],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split_name} accuracy (%), deploy head")
        ax.set_title(f"{model} on {dataset}: deploy-head {split_name} accuracy, mean over seeds, band = min–max",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"curves_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(gs) + 2), 4.0))
        means = [g.deploy_last.mean or 0.0 for g in gs]
        errs = [g.deploy_last.std or 0.0 for g in gs]
        bars = ax.bar(range(len(gs)), means, yerr=errs if any(errs) else None, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(gs)), [g.method for g in gs], rotation=20)
        lo = min(m - e for m, e in zip(means, errs))
        hi = max(m + e for m, e in zip(means, errs))
        bottom = max(0.0, lo - max(2.0, 0.5 * (hi - lo)))
        ax.set_ylim(bottom, min(100.0, hi + max(1.0, 0.2 * (hi - lo))))
        for b, m in zip(bars, means):  # the value inside the bar, clear of the error bar
            ax.annotate(f"{m:.2f}", (b.get_x() + b.get_width() / 2, bottom), ha="center", va="bottom",
                        fontsize=8, color="white", xytext=(0, 4), textcoords="offset points")
        ax.set_ylabel("last-epoch test accuracy (%)")
        ax.set_title(f"{model} on {dataset}: deploy head, last epoch\nmean over seeds, error bar = ±std "
                     "(none for 1 seed)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"final_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------- the report
def write_report(records: Sequence[RunRecord], out_dir: str | Path, *, title: str = "Comparison",
                 command: str | None = None, failures: Sequence[Failure] = (), plots: bool = True,
                 command_label: str = "Command") -> ReportFiles:
    """Write ``results.csv``, ``report.md`` (and the plots) for ``records`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_rows(records)
    records = sorted(records, key=lambda r: (r.key, r.seed))
    rows = [row for r in records for row in run_rows(r)]
    csv_path = out / "results.csv"
    atomic_write_text(rows_to_csv(rows), csv_path)
    groups = summarize_groups(records)

    pngs: list[Path] = []
    skipped = None
    if not records:
        skipped = "no finished runs"
    elif not plots:
        skipped = "plots were turned off"
    elif not plots_available():
        skipped = "matplotlib is not installed (`pip install 'fusionkd[plots]'`)"
    else:
        pngs = write_plots(records, groups, out)

    md = [f"# {title}", "", f"{len(records)} finished run(s); one row per run and head in `results.csv`.", ""]
    if command:
        md += [f"{command_label}:", "", "```bash", command, "```", ""]
    md += [DEFINITIONS, ""]
    for (dataset, model), gs in by_table(groups).items():
        md += [f"## {model} on {dataset}", "", results_table(gs), ""]
        notes = significance_notes(gs)
        if notes:
            md += ["Significance (95 % intervals of the difference to the baseline, deploy head's test "
                   "accuracy):", "", *notes, ""]
        for g in gs:
            if g.inconsistent:
                keys = ", ".join(f"`{k}`" for k in g.inconsistent)
                md.append(f"Warning: the runs of `{g.method}` differ in {keys} — they are not seeds of one "
                          "setting.")
        slug = _slug(f"{dataset}_{model}")
        for p in pngs:
            if p.name in (f"curves_{slug}.png", f"final_{slug}.png"):
                md += ["", f"![{p.stem}]({p.name})"]
        md.append("")
    if skipped and records:
        md += [f"Plots skipped: {skipped}.", ""]
    if failures:
        md += ["## Runs that did not finish (not in the tables)", ""]
        md += [f"- {f.label} (`{f.run_dir}`): {f.error}" for f in failures]
        md.append("")
    if records:
        md += [settings_section(records, teacher_info(records)), "", hardware_section(records), ""]
    md_path = out / "report.md"
    atomic_write_text("\n".join(md), md_path)
    return ReportFiles(csv_path, md_path, pngs, groups, skipped)


def find_unfinished(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders with a ``last.pt`` but no ``summary.json`` (interrupted runs), outside ``teachers/``."""
    out = []
    for p in paths:
        root = Path(p)
        for ck in sorted(root.rglob("last.pt")) if root.is_dir() else []:
            rel = ck.parent.relative_to(root).parts
            if "teachers" not in rel and not (ck.parent / "summary.json").exists():
                out.append(ck.parent)
    return out


def report_from_folders(paths: Sequence[str | Path], out_dir: str | Path | None = None, *,
                        plots: bool = True) -> ReportFiles:
    """``fusionkd report``: rebuild ``results.csv``/``report.md``/plots from any set of run folders.

    ``out_dir`` defaults to the single path given (a compare folder). The command of a compare folder's
    ``compare.json`` is shown when present.
    """
    if not paths:
        raise ValueError("give at least one run folder or compare folder")
    if out_dir is None:
        if len(paths) != 1:
            raise ValueError("several folders given: choose where the report goes with --out DIR")
        out_dir = paths[0]
    folders = find_runs(paths)
    if not folders:
        raise FileNotFoundError("no finished run (a folder with summary.json) under "
                                + ", ".join(map(str, paths)))
    records = [load_run(f) for f in folders]
    command = None
    if len(paths) == 1 and (Path(paths[0]) / "compare.json").is_file():
        command = json.loads((Path(paths[0]) / "compare.json").read_text()).get("command")
    failures = [Failure(str(p.name), str(p), "interrupted (last.pt but no summary.json); re-run the compare "
                        "command or `fusionkd train --resume` to finish it") for p in find_unfinished(paths)]
    return write_report(records, out_dir, command=command, failures=failures, plots=plots,
                        command_label="The last `fusionkd compare` run in this folder")
