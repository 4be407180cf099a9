"""Collect finished runs and turn them into a results table: one row per run and head, then mean ± std
over seeds per (dataset, model, method).

Definitions (also stated in every report):

* **last**: test accuracy (%) after the final epoch (what ``last.pt`` gives).
* **best-val**: test accuracy at the epoch with the highest *validation* accuracy, never chosen on test.
  For the deploy head this is the engine's ``best.pt`` epoch (``summary.json["best"]``); any other head is
  selected by its own validation accuracy from ``metrics.jsonl`` (first epoch of the maximum, as the
  engine does). Without a validation split the last evaluated epoch stands in (``selection = "last"``).
* **std**: sample standard deviation over seeds (``ddof = 1``); undefined (``None``, shown as ``-``) for
  one seed.
* **gain**: ``mean(method) − mean(baseline)`` for the same dataset and model, with its 95 % confidence
  interval: the paired t interval over per-seed differences when both ran the same seeds (>= 2), else
  Welch's; plus Welch's two-sided p-value. A *gain* (or *loss*) is called only when the interval excludes
  zero, else a *tie*; with one seed the call is *unknown*, and when the seeds show no spread (every per-seed
  difference equal, or both groups constant) it is *undetermined*: no spread is no evidence
  (:mod:`fusionkd.compare.stats`).
* **best auxiliary head**: among the heads that are never the deploy head in any run of the group, the one
  with the highest mean last-epoch test accuracy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.flatten import flatten
from .stats import Verdict, compare_groups

#: column order of ``results.csv``
CSV_COLUMNS = (
    "dataset", "model", "method", "family", "seed", "head", "is_deploy_head", "selection", "best_epoch",
    "best_val", "test_at_best_val", "last_epoch", "last_test", "train_time_s", "img_per_s", "params_deploy",
    "params_extra", "epochs", "train_size", "val_size", "test_size", "run_dir",
)
#: families in report order (methods of unknown family come last)
FAMILY_ORDER = ("baseline", "offline", "online", "self")
#: folders ``find_runs`` does not descend into unless named explicitly (a compare's trained teachers)
SKIPPED_FOLDERS = ("teachers",)


@dataclass
class RunRecord:
    """One finished run folder: its ``summary.json``, ``config.yaml`` and ``metrics.jsonl`` lines."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    #: the dataset as the report names it (set by :func:`label_datasets`; default: the dataset's name)
    dataset_label: str | None = None
    #: the teacher, when runs of one method and student learned from different teachers (set by
    #: :func:`label_teachers`; default None: the row is the method's alone)
    teacher_label: str | None = None

    @property
    def label(self) -> str:
        """The run's row in a report: its method, or ``METHOD@VARIANT`` for a variant of a comparison
        (``fusionkd compare --methods kd,kd@ls``), read from the run folder's parent
        (``OUT/runs/<model>/<METHOD@VARIANT>/s<seed>``)."""
        method = str(self.summary.get("method"))
        parent = self.path.parent.name
        label = parent if parent.startswith(method + "@") and len(parent) > len(method) + 1 else method
        return f"{label} (teacher {self.teacher_label})" if self.teacher_label else label

    @property
    def teacher_identity(self) -> tuple[str, str] | None:
        """``(teacher network, its file)`` of an offline run, None for a run without a teacher."""
        t = (self.summary.get("method_extras") or {}).get("teacher")
        if not isinstance(t, dict):
            return None
        return (str(t.get("model")), str(t.get("path") or t.get("weights") or ""))

    @property
    def key(self) -> tuple[str, str, str]:
        """``(dataset, model, method label)``: the group this run is a seed of."""
        s = self.summary
        return (self.dataset_label or str(s.get("dataset")), str(s.get("model")), self.label)

    @property
    def data_identity(self) -> tuple[str, str | None, str | None]:
        """``(dataset name, data_dir, content fingerprint)``: runs that differ here read different data."""
        d = self.summary.get("data") or {}
        return (str(self.summary.get("dataset")), d.get("data_dir"), d.get("fingerprint"))

    @property
    def seed(self) -> int:
        return int(self.summary.get("seed", 0))

    def evaluated(self) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` lines of the epochs whose test accuracy was measured (all evaluated epochs with
        ``eval_test=every``, only the last one by default)."""
        return [m for m in self.metrics if m.get("test")]

    def validated(self) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` lines of the epochs that were evaluated on the validation split."""
        return [m for m in self.metrics if m.get("val")]


def label_datasets(records: Sequence[RunRecord]) -> None:
    """Give runs on different data different dataset labels, so that they never share a row.

    A dataset name read from one place with one content fingerprint keeps its plain name; when runs of one
    name read different folders (``data_dir``) or different content (fingerprint: classes, normalisation,
    split sizes, label counts), each identity is labelled ``name [folder]`` or ``name #fingerprint``."""
    by_name: dict[str, set[tuple[str | None, str | None]]] = {}
    for r in records:
        name, folder, fp = r.data_identity
        by_name.setdefault(name, set()).add((folder, fp))
    for r in records:
        name, folder, fp = r.data_identity
        if len(by_name[name]) == 1:
            r.dataset_label = name
            continue
        folders = {f for f, _ in by_name[name]}
        same_folder_twice = sum(1 for f, _ in by_name[name] if f == folder) > 1
        label = name
        if len(folders) > 1 and folder:
            label += f" [{folder}]"
        if (len(folders) == 1 or same_folder_twice or not folder) and fp:
            label += f" #{fp[:8]}"
        r.dataset_label = label


def label_rows(records: Sequence[RunRecord]) -> None:
    """Label the runs so that runs on different data (:func:`label_datasets`) or with different teachers
    (:func:`label_teachers`) never share a row."""
    label_datasets(records)
    label_teachers(records)


def label_teachers(records: Sequence[RunRecord]) -> None:
    """Give the runs of one method and student that learned from different teachers different rows (a table's
    columns vgg13 -> mobilenetv2 and resnet50 -> mobilenetv2, read by one ``report``): each is labelled by its
    teacher's network, with a short hash of its file's path when two teachers share a network."""
    for r in records:
        r.teacher_label = None
    groups: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
    for r in records:
        if r.teacher_identity is not None:
            groups.setdefault(r.key, set()).add(r.teacher_identity)
    for r in records:
        ids = groups.get(r.key, set())
        if len(ids) < 2 or r.teacher_identity is None:
            continue
        model, path = r.teacher_identity
        same_model = sum(1 for m, _ in ids if m == model) > 1
        digest = hashlib.sha1(path.encode()).hexdigest()[:6]
        r.teacher_label = f"{model} #{digest}" if same_model else model


def summaries_under(root: Path) -> list[Path]:
    """Every ``summary.json`` below ``root``, sorted, following symbolic links to folders (how
    ``experiments/fmnist_protocol.sh`` shares one family's baseline runs with the others), each real folder
    visited once (a link loop ends there)."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        if "summary.json" in files:
            found.append(Path(folder) / "summary.json")
    return sorted(found)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder holding a finished ``summary.json`` under ``paths`` (searched recursively, symbolic
    links to folders followed).

    Folders named ``teachers`` (where ``fusionkd compare`` keeps the teachers it trained) are skipped
    unless a path points into one. Raises FileNotFoundError for a path that does not exist.
    """
    found: dict[Path, None] = {}
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise FileNotFoundError(f"{str(root)!r} does not exist (expected a run folder or a folder of "
                                    "run folders)")
        candidates = [root / "summary.json"] if (root / "summary.json").is_file() else summaries_under(root)
        for s in candidates:
            rel = s.parent.relative_to(root).parts
            if any(part in SKIPPED_FOLDERS for part in rel):
                continue
            try:
                finished = json.loads(s.read_text()).get("finished", False)
            except (OSError, json.JSONDecodeError):
                continue
            if finished:
                found[s.parent.resolve()] = None
    return list(found)


def load_run(folder: str | Path) -> RunRecord:
    """Read a run folder (``summary.json`` required; ``config.yaml`` and ``metrics.jsonl`` if present)."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    config: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    metrics: list[dict[str, Any]] = []
    if (folder / "metrics.jsonl").is_file():
        metrics = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return RunRecord(folder, summary, config, metrics)


# ---------------------------------------------------------------------- per run and head
def _best_by_own_val(rec: RunRecord, head: str) -> tuple[int | None, float | None, float | None, str]:
    """``(epoch, val, test, selection)`` of ``head`` at its own best validation epoch.

    That needs the head's test accuracy at every validated epoch (``eval_test=every``). A run that tested only
    at the end (the default) reports the head at the deploy head's best epoch instead (selection
    ``deploy-val``): ``best.pt`` holds those weights and the engine tested every head on them."""
    lines = [m for m in rec.evaluated() if head in m["test"]]
    with_val = [m for m in lines if head in (m.get("val") or {})]
    validated = [m for m in rec.validated() if head in m["val"]]
    if with_val and len(with_val) == len(validated):
        best = with_val[0]
        for m in with_val[1:]:
            if m["val"][head] > best["val"][head]:  # strict: the first epoch of the maximum, as the engine
                best = m
        return best["epoch"], best["val"][head], best["test"][head], "val"
    if lines and not validated:
        return lines[-1]["epoch"], None, lines[-1]["test"][head], "last"
    b = rec.summary.get("best") or {}  # no metrics.jsonl: the engine's best epoch (chosen by the deploy head)
    return b.get("epoch"), (b.get("val") or {}).get(head), (b.get("test") or {}).get(head), "deploy-val"


def run_rows(rec: RunRecord) -> list[dict[str, Any]]:
    """The ``results.csv`` rows of one run: one per head, deploy head first."""
    s = rec.summary
    deploy = s["deploy_head"]
    last = s.get("last") or {}
    best = s.get("best") or {}
    heads = sorted(last.get("test") or {}, key=lambda h: (h != deploy, h))
    data = s.get("data") or {}
    params = s.get("params") or {}
    common = {
        "dataset": rec.key[0], "model": s.get("model"), "method": rec.label,
        "family": s.get("family"), "seed": s.get("seed"), "last_epoch": last.get("epoch"),
        "train_time_s": s.get("train_time_s"), "img_per_s": s.get("img_per_s"),
        "params_deploy": params.get("deploy"), "params_extra": params.get("extra"), "epochs": s.get("epochs"),
        "train_size": data.get("train"), "val_size": data.get("val"), "test_size": data.get("test"),
        "run_dir": str(rec.path),
    }
    rows = []
    for h in heads:
        if h == deploy:
            # exactly what best.pt holds: the deploy head at that epoch may differ (e.g. FFL's best peer)
            heads_by_epoch = {m["epoch"]: m.get("deploy_head", deploy) for m in rec.metrics}
            at_best = heads_by_epoch.get(best.get("epoch"), deploy)
            b_epoch, b_val = best.get("epoch"), (best.get("val") or {}).get(at_best)
            b_test, sel = (best.get("test") or {}).get(at_best), best.get("selection", "val")
        else:
            b_epoch, b_val, b_test, sel = _best_by_own_val(rec, h)
        rows.append({**common, "head": h, "is_deploy_head": h == deploy, "selection": sel,
                     "best_epoch": b_epoch, "best_val": b_val, "test_at_best_val": b_test,
                     "last_test": last["test"][h]})
    return rows


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``results.csv`` text (floats with 4 decimals, empty cells for missing values)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return v


# ---------------------------------------------------------------------- statistics
@dataclass
class Stat:
    """Mean and sample std (``ddof = 1``; ``None`` when ``n < 2``) of a list of values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    def format(self, digits: int = 2) -> str:
        """``"91.23 ± 0.15"``; ``"91.23 ± -"`` for one value; ``"-"`` for none."""
        if self.mean is None:
            return "-"
        std = "-" if self.std is None else f"{self.std:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {std}"


def gain(method: dict[int, float], baseline: dict[int, float]) -> Verdict | None:
    """The :class:`~fusionkd.compare.stats.Verdict` of ``{seed: value}`` against the baseline's: mean
    difference, 95 % interval (paired by seed when the seed sets match, else Welch), Welch's p-value."""
    return compare_groups(method, baseline)


@dataclass
class GroupStats:
    """Everything the report shows for one (dataset, model, method) group of seeds."""

    dataset: str
    model: str
    method: str
    family: str
    seeds: list[int]
    deploy_heads: list[str]
    deploy_last: Stat
    deploy_best: Stat
    aux_head: str | None
    aux_last: Stat
    aux_best: Stat
    train_time_s: Stat
    img_per_s: Stat
    params_deploy: int | None
    params_extra: int | None
    gain_last: Verdict | None = None
    gain_best: Verdict | None = None
    #: ``{seed: value}`` of the deploy head's last / best-val test accuracy (what the verdicts pair on)
    by_seed_last: dict[int, float] = field(default_factory=dict)
    by_seed_best: dict[int, float] = field(default_factory=dict)
    #: config keys whose values differ between the seeds of this group (should be empty)
    inconsistent: list[str] = field(default_factory=list)


def _values(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None and not _isnan(r[key])]


def _by_seed(rows: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in rows if r.get(key) is not None and not _isnan(r[key])}


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


GroupKey = tuple[str, str, str]


def group_key_order(keys: Iterable[GroupKey], families: dict[str, str]) -> list[GroupKey]:
    """Report order: by dataset, model, then ``baseline`` first, families in FAMILY_ORDER, then name."""

    def rank(k: GroupKey) -> tuple:
        fam = families.get(k[2], "")
        fam_rank = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
        return (k[0], k[1], k[2] != "baseline", fam_rank, k[2])

    return sorted(set(keys), key=rank)


def summarize(records: Sequence[RunRecord]) -> list[GroupStats]:
    """Group runs by (dataset, model, method) and compute the statistics of :class:`GroupStats`."""
    groups: dict[GroupKey, list[RunRecord]] = {}
    label_rows(records)
    for rec in records:
        groups.setdefault(rec.key, []).append(rec)
    families = {k[2]: str(v[0].summary.get("family", "")) for k, v in groups.items()}
    out: list[GroupStats] = []
    for key in group_key_order(groups, families):
        recs = sorted(groups[key], key=lambda r: r.seed)
        rows = [row for rec in recs for row in run_rows(rec)]
        deploy_rows = [r for r in rows if r["is_deploy_head"]]
        deploy_heads = sorted({r["head"] for r in deploy_rows})
        aux_names = sorted({r["head"] for r in rows} - set(deploy_heads))
        aux_head, aux_rows = None, []
        if aux_names:
            by_head = {h: [r for r in rows if r["head"] == h] for h in aux_names}
            aux_head = max(aux_names, key=lambda h: (Stat(_values(by_head[h], "last_test")).mean or -1.0, h))
            aux_rows = by_head[aux_head]
        params_deploy = deploy_rows[0]["params_deploy"] if deploy_rows else None
        params_extra = deploy_rows[0]["params_extra"] if deploy_rows else None
        out.append(GroupStats(
            dataset=key[0], model=key[1], method=key[2], family=families[key[2]],
            seeds=[r.seed for r in recs], deploy_heads=deploy_heads,
            deploy_last=Stat(_values(deploy_rows, "last_test")),
            deploy_best=Stat(_values(deploy_rows, "test_at_best_val")), aux_head=aux_head,
            aux_last=Stat(_values(aux_rows, "last_test")),
            aux_best=Stat(_values(aux_rows, "test_at_best_val")),
            train_time_s=Stat(_values(deploy_rows, "train_time_s")),
            img_per_s=Stat(_values(deploy_rows, "img_per_s")),
            params_deploy=params_deploy, params_extra=params_extra, inconsistent=_inconsistent_keys(recs),
            by_seed_last=_by_seed(deploy_rows, "last_test"), by_seed_best=_by_seed(deploy_rows, "test_at_best_val"),
        ))
    base = {(g.dataset, g.model): g for g in out if g.method == "baseline"}
    for g in out:
        b = base.get((g.dataset, g.model))
        if b is not None and g.method != "baseline":
            g.gain_last, g.gain_best = gain(g.by_seed_last, b.by_seed_last), gain(g.by_seed_best, b.by_seed_best)
    return out


#: config keys that legitimately differ between runs (identity, output, runtime-only settings)
RUNTIME_KEYS = frozenset({"seed", "name", "out_dir", "progress", "log_every", "eval_test", "threads",
                          "eval_batch_size", "tensorboard", "device", "tracker", "tracker_uri",
                          "tracker_experiment"})


def config_flats(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flattened configs, each key that some of them lack (a run of an older fusionkd, before the key
    existed) filled with the key's default, which is what that run used; keys none of them has stay out."""
    from ..engine.config import Config

    flats = [flatten(c) for c in configs]
    present = {k for f in flats for k in f}
    defaults = {k: v for k, v in flatten(Config().to_dict()).items() if k in present}
    return [{**defaults, **f} for f in flats]


def _inconsistent_keys(recs: Sequence[RunRecord]) -> list[str]:
    flats = config_flats([r.config for r in recs if r.config])
    keys = sorted({k for f in flats for k in f} - RUNTIME_KEYS)
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
