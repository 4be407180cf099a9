"""``fusionkd compare`` / ``report`` / ``bench`` / ``demo``: aggregation against hand-computed statistics,
resumable grids (skip finished, resume interrupted, refuse changed settings), worker processes, teachers,
report regeneration, plots, benchmarks and CLI errors."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from fusionkd.cli import main
from fusionkd.compare import aggregate, grid
from fusionkd.compare import demo as demo_mod
from fusionkd.compare import report as report_mod
from fusionkd.compare.aggregate import Stat, find_runs, gain, load_run, run_rows, summarize
from fusionkd.compare.bench import measure
from fusionkd.compare.grid import CompareSpec, compare, parse_seeds, plan
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError
from fusionkd.engine.trainer import Trainer

TINY = {
    "dataset": "synthetic", "image_size": 16, "val_fraction": 0.25, "batch_size": 16, "eval_batch_size": 64,
    "epochs": 2, "lr": 0.05,
    "dataset_options": {"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 32},
}


# ---------------------------------------------------------------------- fabricated runs
def fake_run(root: Path, method: str, seed: int, family: str, curves: dict[str, list[tuple[float, float]]],
             deploy: str = "net", deploy_per_epoch: list[str] | None = None) -> Path:
    """A run folder like the engine writes: ``curves[head][e] = (val, test)`` of epoch e+1."""
    d = root / "runs" / "resnet20" / method / f"s{seed}"
    d.mkdir(parents=True)
    n = len(next(iter(curves.values())))
    lines = []
    for e in range(n):
        head = deploy_per_epoch[e] if deploy_per_epoch else deploy
        lines.append({"epoch": e + 1, "lr": 0.1, "train": {"loss": 1.0}, "time_train_s": 10.0,
                      "img_per_s": 100.0, "val": {h: c[e][0] for h, c in curves.items()},
                      "test": {h: c[e][1] for h, c in curves.items()}, "deploy_head": head})
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    best = lines[0]
    for m in lines[1:]:  # the engine's rule: strictly better validation accuracy of that epoch's deploy head
        if m["val"][m["deploy_head"]] > best["val"][best["deploy_head"]]:
            best = m
    summary = {
        "finished": True, "method": method, "family": family, "model": "resnet20", "dataset": "synthetic",
        "seed": seed, "epochs": n, "deploy_head": deploy, "heads": sorted(curves),
        "best": {"epoch": best["epoch"], "val": best["val"], "test": best["test"], "selection": "val"},
        "last": {"epoch": n, "val": lines[-1]["val"], "test": lines[-1]["test"]},
        "params": {"deploy": 1000, "extra": 500 if len(curves) > 1 else 0, "total": 1500},
        "train_time_s": 10.0 * n + seed, "img_per_s": 100.0 + seed,
        "data": {"train": 90, "val": 10, "test": 40, "name": "synthetic", "subset": None,
                 "val_fraction": 0.1},
        "hardware": {"cpu": "test cpu", "threads": 1, "device": "cpu", "torch": "x", "python": "y",
                     "fusionkd": "z"},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.yaml").write_text(f"method: {method}\nmodel: resnet20\nseed: {seed}\nepochs: {n}\nlr: 0.1\n")
    return d


@pytest.fixture
def fabricated(tmp_path) -> Path:
    net = lambda *vt: {"net": list(vt)}  # noqa: E731
    fake_run(tmp_path, "baseline", 0, "baseline", net((50, 48), (60, 59), (58, 61)))
    fake_run(tmp_path, "baseline", 1, "baseline", net((55, 54), (57, 58), (57, 60)))  # tie: first epoch wins
    fake_run(tmp_path, "baseline", 2, "baseline", net((52, 50), (56, 57), (59, 62)))
    fake_run(tmp_path, "ffl", 0, "online", {
        "sub1": [(60, 59), (64, 63), (63, 65)], "sub2": [(58, 57), (63, 62), (64, 63)],
        "fused": [(62, 61), (66, 64), (65, 67)], "ensemble": [(61, 60), (65, 66), (66, 66)]}, deploy="sub1")
    fake_run(tmp_path, "ffl", 1, "online", {
        "sub1": [(61, 60), (62, 62), (65, 64)], "sub2": [(60, 59), (61, 60), (62, 61)],
        "fused": [(60, 60), (64, 63), (63, 65)], "ensemble": [(62, 61), (63, 62), (64, 63)]}, deploy="sub1")
    fake_run(tmp_path, "kd", 0, "offline", net((50, 50), (60, 62), (59, 62)))
    fake_run(tmp_path, "kd", 1, "offline", net((50, 50), (58, 59), (60, 60)))
    fake_run(tmp_path, "byot", 0, "self", {"net": [(50, 49), (62, 61), (61, 63)],
                                           "branch1": [(40, 41), (45, 44), (44, 46)]})
    return tmp_path


def test_stat_and_gain_by_hand():
    s = Stat([90.0, 92.0, 94.0])
    assert s.mean == pytest.approx(92.0) and s.std == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / (3 - 1))
    assert s.format() == "92.00 ± 2.00"
    one = Stat([91.0])
    assert one.std is None and one.format() == "91.00 ± -" and Stat([]).format() == "-"
    base = {0: 90.0, 1: 92.0, 2: 94.0}
    g = gain({0: 93.0, 5: 95.0}, base)  # different seeds: Welch. diff 2, se sqrt(2/2 + 4/3) = 1.5275
    assert g.diff == pytest.approx(2.0) and not g.paired and g.interval is g.welch
    assert g.welch.t == pytest.approx(2.0 / math.sqrt(1 + 4 / 3))
    assert g.welch.df == pytest.approx((1 + 4 / 3) ** 2 / (1 / 1 + (4 / 3) ** 2 / 2))  # 2.9505
    assert g.call == "tie" and g.interval.lo < 0 < g.interval.hi
    p = gain({0: 91.0, 1: 93.0, 2: 95.5}, base)  # same seeds: paired, d = 1, 1, 1.5
    assert p.paired and p.interval.df == 2 and p.diff == pytest.approx(7 / 6)
    assert p.interval.lo > 0 and p.call == "gain" and "gain" in p.format()
    assert gain({0: 91.0}, base).call == "unknown" and "unknown" in gain({0: 91.0}, base).format()


def test_aggregation_matches_hand_computation(fabricated):
    records = [load_run(p) for p in find_runs([fabricated])]
    assert len(records) == 8
    groups = {g.method: g for g in summarize(records)}
    # baseline first, then by family (offline, online, self)
    assert [g.method for g in summarize(records)] == ["baseline", "kd", "ffl", "byot"]

    b = groups["baseline"]
    assert b.deploy_last.values == [61, 60, 62]
    assert b.deploy_last.mean == pytest.approx(61.0) and b.deploy_last.std == pytest.approx(1.0)
    assert b.deploy_best.values == [59, 58, 62]  # epochs 2, 2 (tie 57/57 keeps the first), 3
    assert b.deploy_best.mean == pytest.approx(59.6667, abs=1e-4)
    assert b.deploy_best.std == pytest.approx(math.sqrt(13 / 3), abs=1e-9)  # devs -2/3, -5/3, 7/3
    assert b.aux_head is None and b.gain_last is None

    f = groups["ffl"]
    assert f.deploy_heads == ["sub1"] and f.seeds == [0, 1]
    assert f.deploy_last.values == [65, 64] and f.deploy_last.std == pytest.approx(math.sqrt(0.5))
    assert f.deploy_best.values == [63, 64]  # sub1's best validation: epoch 2 (64), epoch 3 (65)
    # aux heads: mean last test sub2 62, fused 66, ensemble 64.5 -> fused, selected on its own validation
    assert f.aux_head == "fused"
    assert f.aux_last.values == [67, 65] and f.aux_best.values == [64, 63]
    # ffl ran seeds 0, 1 and the baseline 0, 1, 2: not paired, Welch (65, 64) vs (61, 60, 62)
    assert f.gain_last.diff == pytest.approx(3.5) and not f.gain_last.paired
    assert f.gain_last.welch.t == pytest.approx(3.5 / math.sqrt(0.5 / 2 + 1 / 3))
    assert f.gain_last.call == "gain"
    assert f.gain_best.diff == pytest.approx(63.5 - 179 / 3) and f.gain_best.call == "tie"
    assert f.params_extra == 500 and f.train_time_s.mean == pytest.approx(30.5)

    k = groups["kd"]
    assert k.deploy_last.values == [62, 60] and k.gain_last.diff == pytest.approx(0.0)
    assert k.gain_last.call == "tie" and k.gain_last.welch.p == pytest.approx(1.0)
    assert k.deploy_best.values == [62, 60]  # epoch 2 (60) and epoch 3 (60)

    y = groups["byot"]
    assert y.deploy_last.std is None and y.gain_last.call == "unknown" and y.aux_head == "branch1"


def test_runs_of_one_method_and_student_with_different_teachers_get_rows_of_their_own(tmp_path):
    """A table's columns vgg13 -> resnet20 and resnet50 -> resnet20 read by one report: the kd runs are told apart
    by their teacher (by a hash of the file when two teachers share a network); one teacher keeps the plain row."""
    net = lambda *vt: {"net": list(vt)}  # noqa: E731

    def run(column: str, method: str, seed: int, teacher: tuple[str, str] | None, last: float) -> None:
        d = fake_run(tmp_path / column, method, seed, "offline" if teacher else "baseline", net((50, 50), (last, last)))
        if teacher:
            summary = json.loads((d / "summary.json").read_text())
            summary["method_extras"] = {"teacher": {"model": teacher[0], "path": teacher[1]}}
            (d / "summary.json").write_text(json.dumps(summary))

    for seed in (0, 1):
        run("a", "baseline", seed, None, 60 + seed)
        run("a", "kd", seed, ("vgg13", "t/vgg13/best.pt"), 62 + seed)
        run("b", "kd", seed, ("resnet50", "t/resnet50/best.pt"), 65 + seed)
    groups = {g.method: g for g in summarize([load_run(p) for p in find_runs([tmp_path])])}
    assert sorted(groups) == ["baseline", "kd (teacher resnet50)", "kd (teacher vgg13)"]
    assert groups["kd (teacher vgg13)"].deploy_last.values == [62, 63]
    assert groups["kd (teacher resnet50)"].deploy_last.values == [65, 66]
    assert groups["kd (teacher resnet50)"].gain_last.diff == pytest.approx(5.0)  # against the one baseline

    run("c", "kd", 0, ("vgg13", "other/vgg13/best.pt"), 70)  # a second vgg13 teacher: hashed labels
    labels = sorted(g.method for g in summarize([load_run(p) for p in find_runs([tmp_path])]))
    assert [lab.split(" #")[0] for lab in labels] == ["baseline", "kd (teacher resnet50)", "kd (teacher vgg13",
                                                      "kd (teacher vgg13"]
    assert len(set(labels)) == 4
    one = summarize([load_run(p) for p in find_runs([tmp_path / "a"])])  # one teacher: the plain row
    assert [g.method for g in one] == ["baseline", "kd"]


def test_report_follows_links_to_run_folders_once(tmp_path):
    """experiments/fmnist_protocol.sh links the shared baseline runs into each family's folder: ``report`` over
    that folder finds them through the link (the gains need them), and a link loop is walked once."""
    net = lambda *vt: {"net": list(vt)}  # noqa: E731
    for seed in (0, 1):
        fake_run(tmp_path / "shared", "baseline", seed, "baseline", net((50, 50), (60 + seed, 60 + seed)))
        fake_run(tmp_path / "family", "kd", seed, "offline", net((50, 50), (62 + seed, 62 + seed)))
    link = tmp_path / "family" / "runs" / "resnet20" / "baseline"
    link.symlink_to(tmp_path / "shared" / "runs" / "resnet20" / "baseline", target_is_directory=True)
    (tmp_path / "family" / "loop").symlink_to(tmp_path / "family", target_is_directory=True)
    runs = find_runs([tmp_path / "family"])
    assert len(runs) == 4 and len(set(runs)) == 4
    groups = {g.method: g for g in summarize([load_run(p) for p in runs])}
    assert groups["kd"].gain_last.diff == pytest.approx(2.0)
    assert main(["report", str(tmp_path / "family"), "--no-plots"]) == 0
    assert "| baseline |" in (tmp_path / "family" / "report.md").read_text()


def test_a_key_an_older_run_lacks_counts_as_its_default_in_the_report(tmp_path):
    """Baseline runs of an older fusionkd have no ``model_kwargs`` in their config.yaml (the key came later,
    default ``{}``): the settings section does not list it as a difference; a real difference still is."""
    net = lambda *vt: {"net": list(vt)}  # noqa: E731
    old = fake_run(tmp_path, "baseline", 0, "baseline", net((50, 50), (60, 60)))
    new = fake_run(tmp_path, "kd", 0, "offline", net((50, 50), (61, 61)))
    (new / "config.yaml").write_text("method: kd\nmodel: resnet20\nseed: 0\nepochs: 2\nlr: 0.2\nmodel_kwargs: {}\n")
    text = report_mod.settings_section([load_run(old), load_run(new)])
    assert "`baseline`: `lr=0.1`" in text and "`kd`: `lr=0.2`" in text
    assert "model_kwargs" not in text.split("Settings that differ")[1]
    assert "`model_kwargs={}`" in text  # common to both: the older run used the default
    older_kd = fake_run(tmp_path, "kd", 1, "offline", net((50, 50), (62, 62)))  # no model_kwargs either
    assert aggregate._inconsistent_keys([load_run(new), load_run(older_kd)]) == ["lr"]


def test_results_csv_rows(fabricated):
    rec = load_run(fabricated / "runs" / "resnet20" / "ffl" / "s0")
    rows = {r["head"]: r for r in run_rows(rec)}
    assert rows["sub1"]["is_deploy_head"] and not rows["fused"]["is_deploy_head"]
    fused = rows["fused"]
    assert (fused["best_epoch"], fused["best_val"], fused["test_at_best_val"]) == (2, 66, 64)
    assert (rows["ensemble"]["best_epoch"], rows["ensemble"]["test_at_best_val"]) == (3, 66)
    assert rows["fused"]["last_test"] == 67 and rows["sub1"]["last_epoch"] == 3
    files = report_mod.write_report([load_run(p) for p in find_runs([fabricated])], fabricated, plots=False)
    with open(files.csv) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 3 + 2 * 4 + 2 + 2 and set(table[0]) == set(aggregate.CSV_COLUMNS)
    fused = next(r for r in table if r["method"] == "ffl" and r["seed"] == "0" and r["head"] == "fused")
    assert float(fused["test_at_best_val"]) == 64.0 and fused["is_deploy_head"] == "False"


def test_deploy_head_that_changes_reports_what_best_pt_holds(tmp_path):
    d = fake_run(tmp_path, "ffl", 0, "online", {"sub1": [(60, 59), (61, 61), (70, 64)],
                                                "sub2": [(62, 58), (66, 65), (63, 62)]},
                 deploy="sub1", deploy_per_epoch=["sub2", "sub2", "sub1"])
    row = next(r for r in run_rows(load_run(d)) if r["is_deploy_head"])
    assert row["head"] == "sub1" and row["best_epoch"] == 3
    assert row["test_at_best_val"] == 64 and row["last_test"] == 64
    d2 = fake_run(tmp_path / "b", "ffl", 0, "online", {"sub1": [(60, 59), (61, 61), (62, 64)],
                                                       "sub2": [(62, 58), (66, 65), (63, 62)]},
                  deploy="sub1", deploy_per_epoch=["sub2", "sub2", "sub1"])
    row = next(r for r in run_rows(load_run(d2)) if r["is_deploy_head"])
    assert row["best_epoch"] == 2 and row["test_at_best_val"] == 65  # sub2 was deployed at epoch 2


def test_report_markdown_and_cli_regeneration(fabricated, capsys):
    (fabricated / "teachers" / "t").mkdir(parents=True)
    fake_run(fabricated / "teachers" / "t", "baseline", 7, "baseline", {"net": [(1, 1)]})  # a trained teacher
    (fabricated / "runs" / "resnet20" / "dml" / "s0").mkdir(parents=True)
    (fabricated / "runs" / "resnet20" / "dml" / "s0" / "last.pt").write_bytes(b"")  # an interrupted run
    assert main(["report", str(fabricated)]) == 0
    assert "8 run(s) in 4 group(s)" in capsys.readouterr().out
    md = (fabricated / "report.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert "61.00 ± 1.00" in rows["baseline"] and "59.67 ± 2.08" in rows["baseline"]
    assert "64.50 ± 0.71" in rows["ffl"] and "+3.50 [" in rows["ffl"]
    assert "| fused | 66.00 ± 1.41 | 63.50 ± 0.71" in rows["ffl"]
    assert "+0.00 [" in rows["kd"] and "] tie" in rows["kd"] and "] gain" in rows["ffl"]
    assert "± -" in rows["byot"] and "unknown" in rows["byot"]
    assert "- `ffl` vs `baseline`, last: +3.50 [" in md and "Welch p = " in md
    assert "ddof = 1" in md and "## Hardware" in md and "test cpu" in md and "## Settings" in md
    assert "interrupted" in md and "dml" in md  # the unfinished run is named, never averaged
    assert "Seeds: 0, 1, 2 (" in md and len(find_runs([fabricated / "teachers" / "t"])) == 1
    if report_mod.plots_available():
        assert (fabricated / "curves_synthetic_resnet20.png").stat().st_size > 1000
        assert (fabricated / "final_synthetic_resnet20.png").stat().st_size > 1000
        assert "![curves_synthetic_resnet20](curves_synthetic_resnet20.png)" in md


def test_report_without_matplotlib_says_so(fabricated, monkeypatch, tmp_path):
    monkeypatch.setattr(report_mod, "plots_available", lambda: False)
    files = report_mod.report_from_folders([fabricated], tmp_path / "out")
    assert files.plots == [] and "matplotlib is not installed" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="no finished run"):
        report_mod.report_from_folders([tmp_path / "out"])


# ---------------------------------------------------------------------- real tiny grids
def _spec(out: Path, **kw) -> CompareSpec:
    base = {"methods": ["baseline", "kd"], "models": ["resnet20"], "seeds": [0, 1], "out": out,
            # a 1-epoch teacher is at chance: the students' teacher check is lowered to let it teach anyway
            "common": {**TINY, "teacher_min_accuracy": 0}, "teacher_model": "resnet20", "teacher_epochs": 1,
            "threads": 1}
    return CompareSpec(**{**base, **kw})


@pytest.mark.slow
def test_grid_skips_finished_resumes_interrupted_and_refuses_changes(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    spec = _spec(out)
    teacher, tasks = plan(spec)
    assert teacher is not None and [t.action for t in tasks] == ["fresh"] * 4
    assert all(t.config.teacher is None for t in tasks if t.method == "baseline")
    teacher_ckpt = str((teacher.run_dir / "best.pt").resolve())
    assert all(t.config.teacher == teacher_ckpt for t in tasks if t.method == "kd")
    # interrupt one run after its first epoch, with exactly the config compare will ask for
    cut = next(t for t in tasks if t.method == "baseline" and t.seed == 1)
    trainer = Trainer(cut.config)
    trainer.stop_after = 1
    trainer.fit()
    assert load_checkpoint(cut.run_dir / "last.pt")["epoch"] == 1
    first_epoch = (cut.run_dir / "metrics.jsonl").read_text()

    calls: list[tuple[str, str]] = []
    real = grid.execute

    def counting(config, action, threads, device, **kw):
        calls.append((config["name"], action))
        return real(config, action, threads, device, **kw)

    monkeypatch.setattr(grid, "execute", counting)
    lines: list[str] = []
    r = compare(spec, report=lines.append)
    assert not r.failures
    assert sorted(calls) == sorted([(teacher.config.name, "fresh"), ("resnet20/baseline/s0", "fresh"),
                                    ("resnet20/baseline/s1", "resume"), ("resnet20/kd/s0", "fresh"),
                                    ("resnet20/kd/s1", "fresh")])
    assert calls[0][0] == teacher.config.name  # the teacher trains before the offline runs
    assert any("[2/4] baseline resnet20 seed 1: resuming after epoch 1 of 2" in ln for ln in lines)
    assert any(ln.startswith("[4/4] kd resnet20 seed 1: done") and "0 run(s) left" in ln for ln in lines)
    resumed = (cut.run_dir / "metrics.jsonl").read_text()
    assert resumed.startswith(first_epoch)  # epoch 1 was not trained again
    assert [json.loads(x)["epoch"] for x in resumed.splitlines()] == [1, 2]
    for name in ("results.csv", "report.md", "compare.json"):
        assert (out / name).is_file()
    assert "Teacher of the offline methods: `resnet20`" in (out / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert len(stamps) == 5  # 4 runs + the teacher

    calls.clear()
    r2 = compare(spec, report=lines.append)
    assert calls == [] and not r2.failures  # everything finished earlier: nothing trains
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps

    changed = _spec(out, common={**TINY, "lr": 0.02})
    with pytest.raises(ConfigError, match=r"lr: 0.05 \(stored\) vs 0.02 \(requested\)") as e:
        plan(changed)
    assert "--rerun-changed" in str(e.value)
    changed.rerun_changed = True
    _, tasks = plan(changed)
    assert [t.action for t in tasks] == ["overwrite"] * 4


@pytest.mark.slow
def test_workers_run_in_subprocesses_with_split_threads(tmp_path):
    out = tmp_path / "cmp"
    spec = CompareSpec(methods=["baseline"], models=["resnet20"], seeds=[0, 1], out=out, common=dict(TINY),
                       workers=2, threads=1)
    lines: list[str] = []
    r = compare(spec, report=lines.append)
    assert not r.failures, lines
    assert "2 of 2 runs to train (2 worker(s) × 1 thread(s) each)" in lines[0]
    for t in r.tasks:
        s = json.loads((t.run_dir / "summary.json").read_text())
        assert s["hardware"]["threads"] == 1 and s["finished"]
        worker_log = (out / "logs" / f"resnet20-baseline-s{t.seed}.log").read_text()
        assert "epoch 1 |" in worker_log and "epoch 2 |" in worker_log  # the workers' epoch lines
    assert not list((out / "logs").glob("*.json"))  # task/result/status files are cleaned up
    assert len(r.report.groups) == 1 and r.report.groups[0].seeds == [0, 1]


@pytest.mark.slow
def test_devices_are_handed_to_worker_slots_round_robin(tmp_path):
    spec = CompareSpec(methods=["baseline"], models=["resnet20"], seeds=[0], out=tmp_path, common=dict(TINY),
                       workers=4, threads=1, devices=["cuda:0", "cuda:1"])
    runner = grid.GridRunner(spec, report=None, total_runs=1)
    assert runner.slot_devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    # the device reaches each run's config (cpu here: no GPU on the test machines)
    out = tmp_path / "cmp"
    cpu = CompareSpec(methods=["baseline"], models=["resnet20"], seeds=[0, 1], out=out, common=dict(TINY),
                      workers=2, threads=1, devices=["cpu", "cpu"])
    r = compare(cpu, report=lambda line: None)
    assert not r.failures
    for t in r.tasks:
        assert json.loads((t.run_dir / "summary.json").read_text())["hardware"]["device"] == "cpu"


def test_threads_default_split(monkeypatch):
    monkeypatch.setattr(grid, "cpu_count", lambda: 8)
    assert CompareSpec(["baseline"], ["resnet20"], [0], workers=3).threads_per_worker() == 2
    assert CompareSpec(["baseline"], ["resnet20"], [0], workers=16).threads_per_worker() == 1
    assert CompareSpec(["baseline"], ["resnet20"], [0], workers=3, threads=4).threads_per_worker() == 4


# ---------------------------------------------------------------------- CLI arguments
@pytest.mark.parametrize("argv, fragment", [
    (["--methods", "baseline,fll"], "unknown method 'fll'. Did you mean 'ffl'"),
    (["--methods", "baseline", "--models", "resnet21"], "Accepted models:"),
    (["--methods", "baseline", "--seeds", "0,x"], "'x' is not a seed"),
    (["--methods", "baseline", "options.peers=2"], "use --method-options"),
    (["--methods", "baseline", "--method-options", "frskd:alpha=1"], "'frskd' is not one of --methods"),
    (["--methods", "frskd", "--method-options", "frskd:alpa=1"], "neither an option of 'frskd'"),
    (["--methods", "kd"], "pass teacher=PATH"),
    (["--methods", "kd", "--teacher-model", "resnet56", "teacher=x.pt"], "not both"),
    (["--methods", "baseline", "--devices", "gpu0"], "'gpu0' is not a device"),
    (["--methods", "baseline", "--workers", "0"], "--workers must be at least 1"),
    (["--methods", "baseline", "epochz=3"], "unknown option 'epochz'"),
])
def test_compare_cli_errors_are_clear(argv, fragment, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path), "--dataset", "synthetic", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusionkd compare: error:") and fragment in err
    assert not (tmp_path / "runs").exists()


def test_options_after_method_options_are_common_options(tmp_path, monkeypatch):
    import fusionkd.commands as commands

    seen = {}

    def fake_compare(spec, report=None):  # capture what the CLI asks for, train nothing
        seen["spec"] = spec
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "compare", fake_compare)
    argv = ["compare", "--methods", "baseline,frskd", "--dataset", "synthetic", "--out", str(tmp_path),
            "--method-options", "frskd:alpha=3", "epochs=4", "dataset_options={num_classes: 4}"]
    assert main(argv) == 130  # interrupted (by the fake) with the resume hint
    spec = seen["spec"]
    assert spec.method_options == {"frskd": {"options.alpha": 3}}
    assert spec.common["epochs"] == 4 and spec.common["dataset_options"] == {"num_classes": 4}
    assert commands._split_method_options(["a:b=1", "x=1", "y={p: 1}"]) == (["a:b=1"], ["x=1", "y={p: 1}"])


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5,0") == [0, 3, 4, 5]
    assert parse_seeds("2,2") == [2]
    with pytest.raises(ConfigError):
        parse_seeds("5-3")


# ---------------------------------------------------------------------- bench and demo
def test_measure_builds_offline_method_with_random_teacher():
    torch.manual_seed(0)
    r = measure({"method": "kd", "model": "resnet20", "dataset": "synthetic", "shape": [1, 16, 16],
                 "num_classes": 4, "batch_size": 8, "precision": "fp32", "channels_last": False,
                 "compile": False, "threads": 1, "device": "cpu", "warmup": 1, "repeats": 2, "steps": 1,
                 "teacher_model": "resnet20"})
    assert r["img_per_s"] > 0 and r["loss_finite"] and r["step_ms_median"] >= r["step_ms_min"] > 0
    assert r["params_total"] > 2 * 270_000  # student + teacher
    assert "peak RSS" in r["memory_measure"] and r["peak_memory_mb"] > 0


def test_bench_puts_baseline_first_and_gives_ratios(monkeypatch):
    from fusionkd.compare import bench as bench_mod

    monkeypatch.setattr(bench_mod, "_run_job", measure)  # in this process; the next test runs subprocesses
    spec = bench_mod.BenchSpec(methods=["byot"], models=["resnet20"], dataset="synthetic", shape=(1, 16, 16),
                               num_classes=4, batch_size=8, warmup=1, repeats=2, steps=1, device="cpu")
    res = bench_mod.bench(spec, report=lambda line: None)["results"]
    assert [r["method"] for r in res] == ["baseline", "byot"]
    assert res[0]["time_ratio"] == pytest.approx(1.0)
    assert res[1]["time_ratio"] == pytest.approx(res[0]["img_per_s"] / res[1]["img_per_s"])
    table = bench_mod.format_table({"settings": {**vars(spec), "shape": [1, 16, 16]}, "results": res})
    assert "x baseline" in table and "byot" in table


@pytest.mark.slow
def test_bench_cli_measures_in_a_fresh_process_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "baseline", "--dataset", "synthetic", "--shape", "1,16,16",
            "--num-classes", "4", "--batch-size", "8", "--warmup", "1", "--repeats", "2", "--steps", "1",
            "--json", str(out), "--quiet"]
    assert main(argv) == 0
    assert "peak RSS" in capsys.readouterr().out
    (r,) = json.loads(out.read_text())["results"]
    assert r["method"] == "baseline" and r["time_ratio"] == pytest.approx(1.0)
    assert r["peak_memory_mb"] > 0 and r["img_per_s"] > 0 and r["hardware"]["threads"] == 1
    assert main(["bench", "--methods", "nope"]) == 2


def test_bench_data_runs_the_pipeline_benchmark(monkeypatch, tmp_path):
    from fusionkd.compare import bench as bench_mod

    script = tmp_path / "benchmarks" / "data_pipeline.py"
    script.parent.mkdir()
    script.write_text("import sys, pathlib; pathlib.Path(sys.argv[1]).write_text('ran')\n")
    monkeypatch.setattr(bench_mod, "data_benchmark_script", lambda: script)
    assert main(["bench", "--data", "--data-args", str(tmp_path / "flag")]) == 0
    assert (tmp_path / "flag").read_text() == "ran"


def test_demo_settings_are_valid_and_missing_methods_are_named(tmp_path, monkeypatch, capsys):
    real = demo_mod.demo_options(demo_mod.DEMO_EPOCHS, demo_mod.DEMO_SUBSET)
    spec = CompareSpec(methods=[m for m in demo_mod.DEMO_METHODS if m in grid.METHODS], models=["resnet20"],
                       seeds=[0], out=tmp_path / "real", common=real)
    _, tasks = plan(spec)  # the real demo config validates (no training here)
    cfg = tasks[0].config
    assert cfg.dataset == "fashion-mnist" and cfg.precision == "bf16" and cfg.channels_last
    assert cfg.subset == demo_mod.DEMO_SUBSET and cfg.schedule == "cosine"
    # validation sized for the subset: a fifth of it (1,000 of 60,000 images), not 10 % of Fashion-MNIST
    assert round(cfg.val_fraction * 60_000) == demo_mod.DEMO_SUBSET // 5 == 1000
    assert demo_mod.demo_val_images(1000) == 500  # never below 500 images

    monkeypatch.setattr(demo_mod, "DEMO_METHODS", ("baseline", "no_such_method"))
    monkeypatch.setattr(demo_mod, "demo_options", lambda epochs, subset, precision: {**TINY, "epochs": 1})
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "left out: no_such_method" in out and "baseline" in out and "wall time" in out
    assert (tmp_path / "demo" / "report.md").is_file()
    assert os.path.isdir(tmp_path / "demo" / "runs" / "resnet20" / "baseline" / "s0")


def test_method_options_reach_their_runs_with_and_without_a_config_file(tmp_path):
    opts = grid.parse_method_options(["frskd:alpha=0.8", "ffl:peers=3", "ffl:lr=0.02"], ["baseline", "ffl", "frskd"])
    for config_file in (None, tmp_path / "c.yaml"):
        if config_file is not None:
            config_file.write_text("epochs: 3\n")
        spec = CompareSpec(methods=["baseline", "ffl", "frskd"], models=["resnet20"], seeds=[0], out=tmp_path / "o",
                           common=dict(TINY), method_options=opts, config_file=config_file)
        _, tasks = plan(spec)
        cfg = {t.method: t.config for t in tasks}
        assert cfg["frskd"].options == {"alpha": 0.8} and cfg["ffl"].options == {"peers": 3}
        assert cfg["ffl"].lr == 0.02 and cfg["baseline"].lr == TINY["lr"] and cfg["baseline"].options == {}
    # the demo's short-run FRSKD settings get there too
    demo_spec_opts = {m: o for m, o in demo_mod.DEMO_METHOD_OPTIONS.items()}
    spec = CompareSpec(methods=["frskd"], models=["resnet20"], seeds=[0], out=tmp_path / "d", common=dict(TINY),
                       method_options=demo_spec_opts)
    assert plan(spec)[1][0].config.options == {"alpha": 0.8, "beta": 37.0}
