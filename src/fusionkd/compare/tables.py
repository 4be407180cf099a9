"""Published tables as one command: ``fusionkd compare --table NAME``.

A *table* is a YAML file in ``fusionkd/presets/tables/``: a published comparison (a paper's table or a
repository's README table) written down as what to run and what was published:

* **columns**: the network pairs (``{teacher: resnet56, student: resnet20}``) or, for online and self
  methods, the networks (``{model: resnet18}``); a column may name its own preset (``config:``, e.g. the
  lr-0.01 recipe of MobileNetV2 students) and config options (``options:``);
* **rows**: the methods (``kd``) or method variants (``kd@ls``), each with its options and per-column
  options (``per_column: {"resnet56->resnet20": {beta: 2}}``, as the authors' per-pair configs);
* **published**: per row (``teacher`` and ``baseline`` included) and column, the published number and the
  key of its source in ``sources``; a cell whose number could not be found is ``null`` with a ``note``;
* **config** (a preset, e.g. ``cifar100-offline``), **common** options, default **seeds** and a **cpu**
  section: the options that make the whole table fit a CPU (``--size cpu``), with ``cpu_rows``: row
  options at that size (e.g. a warm-up scaled to the shorter run).

:func:`run_table` trains the teachers first (one ``compare`` in ``OUT/teachers/``, seed 0, the table's
settings; or takes a community teacher file per teacher from ``teachers_dir``), then one ``compare`` per
column in ``OUT/columns/<column>/`` (baseline student + every row, each seed; the usual resumable grid with
its own report), and writes ``OUT/table.md``, ``OUT/table.csv`` and ``OUT/table.json``: our mean ± std and
the interval verdict against the column's student baseline beside the published number and its source.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.checkpoint import atomic_write_text
from ..engine.config import ConfigError
from ..errors import RunsFailedError
from ..methods import METHODS
from ..models import MODELS
from ..presets import TABLE_DIR, list_tables, preset_path
from ..registry import UnknownNameError
from .aggregate import GroupStats, find_runs, load_run, summarize
from .planning import method_of, parse_method_options, parse_names

log = logging.getLogger("fusionkd")

SIZES = ("full", "cpu")
#: the file names a community teacher may have inside ``teachers_dir`` (RepDistiller's and mdistiller's
#: download layout first: ``<name>_vanilla/ckpt_epoch_240.pth``)
COMMUNITY_FILES = ("{t}_vanilla/ckpt_epoch_240.pth", "{t}_vanilla.pth", "{t}.pth", "{t}.pt", "{t}.pth.tar")


@dataclass
class Column:
    """One column of a table: a teacher -> student pair, or one network (online / self tables)."""

    model: str
    teacher: str | None = None
    config: str | None = None  #: a preset for this column's runs (default: the table's)
    options: dict[str, Any] = field(default_factory=dict)  #: config options of this column's runs

    @property
    def key(self) -> str:
        return f"{self.teacher}->{self.model}" if self.teacher else self.model

    @property
    def folder(self) -> str:
        return f"{self.teacher}-{self.model}" if self.teacher else self.model


@dataclass
class Row:
    """One row: a registered method or a variant ``METHOD@VARIANT``, with its options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    per_column: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Cell:
    """A published number (``None`` when none could be found) and the key of its source."""

    value: float | None
    source: str | None = None
    note: str = ""


@dataclass
class Table:
    """A published table, as :func:`load_table` reads it."""

    name: str
    title: str
    source: str
    family: str
    config: str
    columns: list[Column]
    rows: list[Row]
    published: dict[str, dict[str, Cell]]
    sources: dict[str, str]
    common: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    #: row options at ``--size cpu`` (e.g. a warm-up scaled to the shorter run), by row label
    cpu_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher_epochs: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def offline(self) -> bool:
        return any(c.teacher for c in self.columns)

    def row_names(self) -> list[tuple[str, str]]:
        """``[(label, display name)]``: the teacher (offline tables), the student baseline, the rows."""
        first = [("teacher", "Teacher")] if self.offline else []
        return first + [("baseline", "Baseline" if not self.offline else "Student")] + \
            [(r.label, r.name) for r in self.rows]


def table_path(name: str) -> Path:
    p = TABLE_DIR / f"{name}.yaml"
    if "/" in name or "\\" in name or not p.is_file():
        import difflib

        names = [t["name"] for t in list_tables()]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--table {name!r}: no such table; {hint}the tables are: {', '.join(names)} "
                          "(fusionkd list)")
    return p


def _check_name(name: str, kind: str, where: str) -> None:
    registry = METHODS if kind == "method" else MODELS
    try:
        registry.entry(method_of(name) if kind == "method" else name)
    except UnknownNameError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_table(name: str) -> Table:
    """Read and check table ``name`` (every name registered, every published cell on a row and column)."""
    path = table_path(name)
    d = yaml.safe_load(path.read_text()) or {}
    where = f"table {name!r} ({path})"
    columns = []
    for c in d.get("columns") or []:
        col = Column(model=c.get("student") or c["model"], teacher=c.get("teacher"), config=c.get("config"),
                     options=dict(c.get("options") or {}))
        for m in filter(None, (col.model, col.teacher)):
            _check_name(m, "model", where)
        columns.append(col)
    rows = [Row(label=r["row"], name=r.get("name", r["row"]), options=dict(r.get("options") or {}),
                per_column={k: dict(v) for k, v in (r.get("per_column") or {}).items()})
            for r in d.get("rows") or []]
    for r in rows:
        parse_names([r.label], "method")
    sources = {str(k): str(v) for k, v in (d.get("sources") or {}).items()}
    published: dict[str, dict[str, Cell]] = {}
    for row, cells in (d.get("published") or {}).items():
        for col, cell in (cells or {}).items():
            value, src, note = (cell + [None, None, ""])[:3] if isinstance(cell, list) else (cell, None, "")
            published.setdefault(str(row), {})[str(col)] = Cell(None if value is None else float(value), src,
                                                               note or "")
    t = Table(name=name, title=str(d.get("title", name)), source=str(d.get("source", "")),
              family=str(d.get("family", "")), config=str(d.get("config", "")), columns=columns, rows=rows,
              published=published, sources=sources, common=dict(d.get("common") or {}),
              cpu=dict(d.get("cpu") or {}),
              cpu_rows={str(k): dict(v) for k, v in (d.get("cpu_rows") or {}).items()},
              seeds=list(d.get("seeds") or [0, 1, 2]),
              teacher_epochs=d.get("teacher_epochs"), notes=list(d.get("notes") or []))
    _check_table(t, where)
    return t


def _check_table(t: Table, where: str) -> None:
    if not t.columns or not t.rows:
        raise ConfigError(f"{where}: a table needs columns and rows")
    for preset in filter(None, [t.config, *(c.config for c in t.columns)]):
        if preset_path(preset) is None:
            raise ConfigError(f"{where}: {preset!r} is not a preset")
    keys = {c.key for c in t.columns}
    labels = {label for label, _ in t.row_names()}
    for row, cells in t.published.items():
        if row not in labels:
            raise ConfigError(f"{where}: published row {row!r} is not a row ({', '.join(sorted(labels))})")
        for col, cell in cells.items():
            if col not in keys:
                raise ConfigError(f"{where}: published column {col!r} is not a column ({', '.join(keys)})")
            if cell.value is not None and cell.source not in t.sources:
                raise ConfigError(f"{where}: published {row} / {col}: source {cell.source!r} is not in sources")
    unknown_rows = sorted(set(t.cpu_rows) - {r.label for r in t.rows})
    if unknown_rows:
        raise ConfigError(f"{where}: cpu_rows {unknown_rows} are not rows")
    for r in t.rows:
        unknown = sorted(set(r.per_column) - keys)
        if unknown:
            raise ConfigError(f"{where}: row {r.label!r}: per_column {unknown} are not columns")


# ---------------------------------------------------------------------------------------------- running
@dataclass
class TableRun:
    """How to run a table (the arguments of ``fusionkd compare --table``)."""

    table: Table
    out: Path
    seeds: list[int] | None = None  #: default: the table's
    size: str = "full"
    overrides: dict[str, Any] = field(default_factory=dict)  #: key=value options of every run (win last)
    teacher_epochs: int | None = None
    teachers_dir: Path | None = None
    workers: int = 1
    threads: int | None = None
    devices: list[str] | None = None
    rerun_changed: bool = False
    command: str | None = None
    #: run only these columns (their key ``t->s`` or folder ``t-s``); the table still lists every column
    columns: list[str] | None = None

    def selected(self) -> list[Column]:
        """The columns to run, checked against the table's."""
        cols = self.table.columns
        if not self.columns:
            return cols
        names = {c.key: c for c in cols} | {c.folder: c for c in cols}
        unknown = [c for c in self.columns if c not in names]
        if unknown:
            raise ConfigError(f"--columns {', '.join(unknown)}: not a column of table {self.table.name!r} "
                              f"(its columns: {', '.join(c.folder for c in cols)})")
        wanted = {names[c].key for c in self.columns}
        return [c for c in cols if c.key in wanted]

    def common(self) -> tuple[dict[str, Any], int | None]:
        """The options of every run and the teachers' epochs, for this size."""
        if self.size not in SIZES:
            raise ConfigError(f"--size {self.size!r}: expected one of {', '.join(SIZES)}")
        t = self.table
        sized = dict(t.cpu) if self.size == "cpu" else {}
        teacher_epochs = sized.pop("teacher_epochs", None) or t.teacher_epochs
        common = {**t.common, **sized, **self.overrides}
        return common, self.teacher_epochs or teacher_epochs


def community_teacher(teachers_dir: Path, teacher: str) -> Path | None:
    """The community file of ``teacher`` in ``teachers_dir`` (see :data:`COMMUNITY_FILES`), or None."""
    for pattern in COMMUNITY_FILES:
        p = teachers_dir / pattern.format(t=teacher)
        if p.is_file():
            return p
    return None


def run_table(run: TableRun, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train what is missing (teachers, then one grid per column) and write ``table.md/csv/json``."""
    from .grid import CompareSpec, compare

    t, out = run.table, Path(run.out)
    check_table_files(out)
    seeds = run.seeds or t.seeds
    common, teacher_epochs = run.common()
    columns = run.selected()
    if run.teachers_dir is not None and not Path(run.teachers_dir).is_dir():
        raise ConfigError(f"--teachers-dir {run.teachers_dir}: not a folder")
    kw = dict(workers=run.workers, threads=run.threads, devices=run.devices, rerun_changed=run.rerun_changed)
    community = {c.teacher: community_teacher(Path(run.teachers_dir), c.teacher)
                 for c in t.columns if c.teacher and run.teachers_dir is not None}
    to_train = list(dict.fromkeys(c.teacher for c in columns if c.teacher and not community.get(c.teacher)))
    failures: list[str] = []
    if to_train:
        say(f"table {t.name}: training the teacher(s) {', '.join(to_train)} (seed 0) in {out / 'teachers'}")
        tcommon = {**common, **({"epochs": teacher_epochs} if teacher_epochs else {})}
        tcommon.pop("teacher_min_accuracy", None)
        res = compare(CompareSpec(methods=["baseline"], models=to_train, seeds=[0], out=out / "teachers",
                                  common=tcommon, config_file=t.config or None, title=f"{t.title}: teachers",
                                  command=run.command, **kw), report=say)
        if res.failures:
            raise RunsFailedError("teacher run(s) failed, so no student of theirs was trained: "
                                  + "; ".join(f.label for f in res.failures)
                                  + f" (logs and report in {out / 'teachers'})")
    for col in columns:
        col_common = {**common, **col.options}
        if col.teacher:
            if community.get(col.teacher):
                col_common.update(teacher_model=col.teacher, teacher_weights=str(community[col.teacher]))
            else:
                col_common["teacher"] = str(teacher_dir(out, col.teacher) / "best.pt")
        labels = [r.label for r in t.rows]
        sized = t.cpu_rows if run.size == "cpu" else {}
        items = [f"{r.label}:{k}={json.dumps(v)}" for r in t.rows
                 for k, v in {**r.options, **r.per_column.get(col.key, {}), **sized.get(r.label, {})}.items()]
        say(f"table {t.name}: column {col.key} ({len(labels) + 1} rows x {len(seeds)} seeds) in "
            f"{out / 'columns' / col.folder}")
        res = compare(CompareSpec(methods=["baseline", *labels], models=[col.model], seeds=seeds,
                                  out=out / "columns" / col.folder, common=col_common,
                                  method_options=parse_method_options(items, ["baseline", *labels]),
                                  config_file=col.config or t.config or None, title=f"{t.title}: {col.key}",
                                  command=run.command, **kw), report=say)
        failures += [f"{col.key}: {f.label}" for f in res.failures]
    result = collect(t, out, run.size, seeds, community)
    result["failures"] = failures
    result["notes"] = dataset_notes(t, common) + result["notes"]
    write_table(result, out)
    return result


def table_dataset(t: Table) -> str | None:
    """The dataset the table's published numbers are for (its common options, else its preset's)."""
    if "dataset" in t.common:
        return str(t.common["dataset"])
    p = preset_path(t.config) if t.config else None
    return str((yaml.safe_load(p.read_text()) or {}).get("dataset")) if p is not None else None


def dataset_notes(t: Table, common: dict[str, Any]) -> list[str]:
    """A note when the runs' dataset is not the one the published numbers are for."""
    own = table_dataset(t)
    if common.get("dataset") in (None, own):
        return []
    return [f"This run used dataset {common['dataset']!r}, not the table's {own!r}: the published numbers are for "
            f"{own!r} and do not compare with these."]


TABLE_FILES = ("table.md", "table.csv", "table.json")


def check_table_files(out: Path) -> None:
    """Refuse, before any work, to write over ``table.*`` files in ``out`` that a table run did not write: they
    may be overwritten only when ``table.json`` is there and is one (it names its table and has its cells)."""
    present = [n for n in TABLE_FILES if (out / n).exists()]
    if not present:
        return
    try:
        ours = json.loads((out / "table.json").read_text())
        ok = isinstance(ours, dict) and "table" in ours and isinstance(ours.get("cells"), list)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{out} holds {', '.join(present)} that no `fusionkd compare --table` wrote; they would be "
                          "overwritten: choose another --out")


def teacher_dir(out: Path, teacher: str) -> Path:
    return out / "teachers" / "runs" / teacher / "baseline" / "s0"


# ---------------------------------------------------------------------------------------------- results
def _teacher_cell(out: Path, teacher: str, community: dict[str, Path | None]) -> dict[str, Any]:
    if community.get(teacher):
        return {"ours": None, "std": None, "n": 0, "verdict": None, "call": None,
                "note": f"community file {community[teacher]}"}
    s = teacher_dir(out, teacher) / "summary.json"
    if not s.is_file():
        return {"ours": None, "std": None, "n": 0, "verdict": None, "call": None, "note": "not trained"}
    summary = json.loads(s.read_text())
    last = ((summary.get("last") or {}).get("test") or {}).get(summary.get("deploy_head", "net"))
    return {"ours": last, "std": None, "n": 1, "verdict": None, "call": None, "note": "seed 0, last epoch"}


def _group_cell(g: GroupStats | None) -> dict[str, Any]:
    if g is None:
        return {"ours": None, "std": None, "n": 0, "verdict": None, "call": None, "note": "no finished run"}
    v = g.gain_last
    return {"ours": g.deploy_last.mean, "std": g.deploy_last.std, "n": g.deploy_last.n,
            "best_val": g.deploy_best.mean, "verdict": v.format() if v else None, "call": v.call if v else None,
            "note": ""}


def collect(t: Table, out: Path, size: str, seeds: list[int], community: dict[str, Path | None]) -> dict[str, Any]:
    """Our numbers per (row, column) from the finished run folders, beside the published ones."""
    cells: list[dict[str, Any]] = []
    for col in t.columns:
        folder = out / "columns" / col.folder / "runs"
        records = [load_run(p) for p in find_runs([folder])] if folder.is_dir() else []
        groups = {g.method: g for g in summarize(records) if g.model == col.model}
        for label, name in t.row_names():
            ours = _teacher_cell(out, col.teacher, community) if label == "teacher" else _group_cell(
                groups.get(label))
            pub = t.published.get(label, {}).get(col.key) or Cell(None, None, "not in the table's sources")
            cells.append({"row": label, "name": name, "column": col.key, "teacher": col.teacher,
                          "model": col.model, **ours, "published": pub.value,
                          "source": t.sources.get(pub.source or "", "") if pub.value is not None else "",
                          "published_note": pub.note or ("" if pub.value is not None else "not found")})
    return {"table": t.name, "title": t.title, "source": t.source, "size": size, "seeds": seeds,
            "columns": [c.key for c in t.columns], "rows": [n for _, n in t.row_names()], "cells": cells,
            "notes": t.notes, "sources": t.sources}


def _num(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if std is None else f"{v:.2f} ± {std:.2f}"


def render_markdown(result: dict[str, Any]) -> str:
    """``table.md``: our numbers beside the published ones, the verdicts, and every cell's source."""
    cols, cells = result["columns"], result["cells"]
    by = {(c["name"], c["column"]): c for c in cells}
    size = "the published recipe" if result["size"] == "full" else "the CPU size (`--size cpu`: a subset and " \
        "fewer epochs, so the numbers are not comparable with the published ones)"
    lines = [f"# {result['title']}", "", f"Source: {result['source']}", "",
             f"Run at {size}; seeds {', '.join(map(str, result['seeds']))}. Each cell: **our** last-epoch test "
             "accuracy (%), mean ± sample std over seeds (the teacher: seed 0), then the *published* number in "
             "brackets (`n/f`: not found in the sources).", ""]
    head = "| method | " + " | ".join(cols) + " |"
    lines += [head, "|---|" + "---:|" * len(cols)]
    for name in result["rows"]:
        row = []
        for col in cols:
            c = by[(name, col)]
            pub = "n/f" if c["published"] is None else f"{c['published']:.2f}"
            row.append(f"{_num(c['ours'], c['std'])} ({pub})")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "Ours minus our student baseline, last epoch, with the 95 % interval and its verdict (paired by "
              "seed; *gain*/*loss* only when the interval excludes zero):", "", head,
              "|---|" + "---:|" * len(cols)]
    for name in result["rows"]:
        if name in ("Teacher", "Student", "Baseline"):
            continue
        lines.append(f"| {name} | " + " | ".join(by[(name, col)]["verdict"] or "-" for col in cols) + " |")
    lines += ["", "## Published numbers and their sources", ""]
    for c in cells:
        if c["published"] is None:
            lines.append(f"- {c['name']}, {c['column']}: not found ({c['published_note']})")
        else:
            note = f" ({c['published_note']})" if c["published_note"] else ""
            lines.append(f"- {c['name']}, {c['column']}: {c['published']:.2f}: {c['source']}{note}")
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    if result.get("failures"):
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in result["failures"]]
    lines += ["", "Each column's own report (best-validation numbers, intervals, settings, hardware): "
              "`columns/<column>/report.md`."]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("row", "name", "column", "teacher", "model", "n", "ours", "std", "best_val", "verdict", "call",
              "published", "source", "published_note", "note")


def write_table(result: dict[str, Any], out: Path) -> list[Path]:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in result["cells"]:
        w.writerow({k: ("" if c.get(k) is None else c.get(k)) for k in CSV_FIELDS})
    files = [out / "table.md", out / "table.csv", out / "table.json"]
    atomic_write_text(render_markdown(result), files[0])
    atomic_write_text(buf.getvalue(), files[1])
    atomic_write_text(json.dumps(result, indent=2, default=str), files[2])
    return files
