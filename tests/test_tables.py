"""Published tables (``fusionkd compare --table NAME``) and method variants (``--methods kd,kd@ls``).

The end-to-end tests run real tables on CIFAR-100 files written here in the official python-pickle layout
(``cifar-100-python/{train,test,meta}``), at a tiny size, and check that every cell, teacher and published
number of the table appears in ``table.md`` / ``table.csv``.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_community_weights import randomise, repdistiller, save_teacher

from fusionkd.cli import main
from fusionkd.compare import tables as tables_mod
from fusionkd.compare.aggregate import find_runs, load_run
from fusionkd.compare.grid import CompareSpec, plan
from fusionkd.compare.tables import load_table, render_markdown
from fusionkd.engine.config import ConfigError
from fusionkd.presets import list_tables

TINY = {"dataset": "synthetic", "image_size": 16, "val_fraction": 0.25, "batch_size": 16, "eval_batch_size": 64,
        "epochs": 1, "lr": 0.05,
        "dataset_options": {"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 32}}


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """The official ``cifar-100-python`` pickles (uint8 rows of 3072 values, fine and coarse labels, meta)."""
    folder = root / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        batch = {b"filenames": [f"img{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


#: a tiny size on top of --size cpu: 100 train / 100 validation / 100 test images, 2 epochs, teachers 1 epoch
TINY_TABLE = ["--size", "cpu", "--seeds", "0", "--teacher-epochs", "1", "epochs=2", "val_fraction=0.5",
              "subset=null", "batch_size=50", "eval_batch_size=100", "teacher_min_accuracy=0", "precision=fp32"]


def check_every_cell(out: Path, name: str, community: set[str] = frozenset()) -> dict:
    """Every row x column of the table in table.md and table.csv; each published number and source named."""
    t = load_table(name)
    md = (out / "table.md").read_text()
    rows = list(csv.DictReader((out / "table.csv").open()))
    result = json.loads((out / "table.json").read_text())
    assert render_markdown(result) == md  # table.md is the rendering of table.json
    names = [n for _, n in t.row_names()]
    assert len(rows) == len(names) * len(t.columns)
    for col in t.columns:
        assert col.key in md.splitlines()[next(i for i, ln in enumerate(md.splitlines()) if ln.startswith("| method"))]
        for label, row_name in t.row_names():
            [r] = [r for r in rows if r["column"] == col.key and r["name"] == row_name]
            pub = t.published.get(label, {}).get(col.key)
            if label == "teacher" and col.teacher in community:
                assert "community file" in r["note"] and r["ours"] == ""
            else:  # every run finished: a number of ours in every cell
                assert r["ours"] != "", (label, col.key, r)
                assert r["n"] == ("1")
            if pub is not None and pub.value is not None:
                assert float(r["published"]) == pub.value
                assert r["source"] == t.sources[pub.source]
                assert f"- {row_name}, {col.key}: {pub.value:.2f}: {t.sources[pub.source]}" in md
            else:
                assert r["published"] == "" and f"- {row_name}, {col.key}: not found" in md
        for label, row_name in t.row_names():
            line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row_name} |"))
            pub = t.published.get(label, {}).get(col.key)
            assert (f"({pub.value:.2f})" if pub is not None and pub.value is not None else "(n/f)") in line
    return result


# ---------------------------------------------------------------------------------------------- shipped tables
def test_every_shipped_table_loads_and_names_its_sources():
    shipped = {p.stem for p in tables_mod.TABLE_DIR.glob("*.yaml")}
    assert {t["name"] for t in list_tables()} == shipped
    assert {"cifar100-repdistiller", "cifar100-repdistiller-hetero", "ffl-cifar100", "frskd-cifar100",
            "mfkd-cifar100", "fmfsd-cifar100", "mfef-cifar100"} <= shipped
    for name in shipped:
        t = load_table(name)
        assert t.title and t.source and t.cpu.get("epochs")
        for row, cells in t.published.items():
            for col, cell in cells.items():
                assert cell.value is None or (cell.source in t.sources and 0 < cell.value < 100), (name, row, col)
                assert cell.value is not None or cell.note, (name, row, col)  # a missing number says why
    assert {tables_mod.table_dataset(load_table(n)) for n in shipped} == {"cifar100"}
    t = load_table("ffl-cifar100")
    assert tables_mod.dataset_notes(t, {"dataset": "cifar100"}) == [] and tables_mod.dataset_notes(t, {}) == []
    [note] = tables_mod.dataset_notes(t, {"dataset": "cifar10"})
    assert "used dataset 'cifar10', not the table's 'cifar100'" in note
    main_table = load_table("cifar100-repdistiller")
    assert [c.key for c in main_table.columns] == [
        "resnet56->resnet20", "resnet110->resnet32", "resnet32x4->resnet8x4", "wrn_40_2->wrn_16_2",
        "wrn_40_2->wrn_40_1", "vgg13->vgg8"]
    assert [r.label for r in main_table.rows] == ["kd", "fitnet", "at", "crd", "reviewkd", "dkd", "dist", "kd@ls",
                                                  "dkd@ls"]
    dkd = next(r for r in main_table.rows if r.label == "dkd")
    assert dkd.per_column["resnet56->resnet20"] == {"beta": 2.0} and dkd.per_column["vgg13->vgg8"] == {"beta": 6.0}
    assert main_table.published["crd"]["resnet56->resnet20"].value == 71.16


def test_fusionkd_list_names_the_tables(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tables (fusionkd compare --table NAME" in out and "cifar100-repdistiller " in out


def _write_table(tmp_path: Path, monkeypatch, **changes) -> str:
    d = yaml.safe_load((tables_mod.TABLE_DIR / "mfkd-cifar100.yaml").read_text())
    d.update(changes)
    folder = tmp_path / "tables"
    folder.mkdir(exist_ok=True)
    (folder / "mine.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.setattr(tables_mod, "TABLE_DIR", folder)
    return "mine"


@pytest.mark.parametrize("changes, fragment", [
    ({"rows": [{"row": "kdd"}]}, "unknown method 'kdd'"),
    ({"rows": [{"row": "kd@"}]}, "a variant after '@'"),
    ({"columns": [{"teacher": "resnet56", "student": "resnet2"}]}, "unknown model 'resnet2'"),
    ({"published": {"kd": {"resnet56->resnet21": [70.0, "mdistiller"]}}}, "published column 'resnet56->resnet21'"),
    ({"published": {"dkd": {"resnet56->resnet20": [70.0, "mdistiller"]}}}, "published row 'dkd' is not a row"),
    ({"published": {"kd": {"resnet56->resnet20": [70.0, "nowhere"]}}}, "source 'nowhere' is not in sources"),
    ({"config": "cifar100-offlin"}, "'cifar100-offlin' is not a preset"),
    ({"cpu_rows": {"dkd": {"warmup_epochs": 1}}}, "cpu_rows ['dkd'] are not rows"),
])
def test_a_broken_table_is_refused_naming_what_is_wrong(tmp_path, monkeypatch, changes, fragment):
    name = _write_table(tmp_path, monkeypatch, **changes)
    with pytest.raises(ConfigError) as e:
        load_table(name)
    assert fragment in str(e.value)


@pytest.mark.parametrize("argv, fragment", [
    (["--table", "cifar100-repdistillr"], "no such table; did you mean 'cifar100-repdistiller'? the tables are: "),
    (["--table", "mfkd-cifar100", "--methods", "kd"], "drop --methods"),
    (["--table", "mfkd-cifar100", "--models", "resnet8"], "drop --models"),
    (["--methods", "kd", "--size", "cpu"], "--teachers-dir, --size and --columns belong to --table"),
    (["--table", "mfkd-cifar100", "--columns", "resnet56-resnet2"], "not a column of table 'mfkd-cifar100' (its "
                                                                    "columns: resnet56-resnet20, vgg13-vgg8)"),
    ([], "give --methods"),
    (["--table", "mfkd-cifar100", "--teachers-dir", "/nonexistent/teachers"], "not a folder"),
])
def test_table_cli_refusals_are_clear(tmp_path, capsys, argv, fragment):
    assert main(["compare", *argv, "--out", str(tmp_path / "o")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o" / "columns").exists()


# ---------------------------------------------------------------------------------------------- variants
def test_method_variants_are_rows_of_their_own(tmp_path):
    from fusionkd.compare.grid import parse_method_options, parse_names

    methods = ["baseline", "kd", "kd@ls"]
    opts = parse_method_options(["kd@ls:logit_std=true", "kd@ls:temperature=2"], methods)
    spec = CompareSpec(methods=methods, models=["resnet8"], seeds=[0], out=tmp_path / "o",
                       common={**TINY, "teacher_min_accuracy": 0}, method_options=opts, teacher_model="resnet8",
                       threads=1)
    _, tasks = plan(spec)
    by = {t.method: t for t in tasks}
    assert by["kd@ls"].config.method == "kd" and by["kd@ls"].config.options == {"logit_std": True,
                                                                                "temperature": 2}
    assert by["kd"].config.options == {}
    assert by["kd@ls"].run_dir == tmp_path / "o" / "runs" / "resnet8" / "kd@ls" / "s0"
    with pytest.raises(ConfigError, match=r"'kd@ls!'.*variant after '@'"):
        parse_names("kd,kd@ls!", "method")
    with pytest.raises(ConfigError, match="unknown method 'kdx'"):
        parse_names("kdx@ls", "method")
    with pytest.raises(ConfigError, match=r"'kd@lss' is not one of --methods"):
        parse_method_options(["kd@lss:logit_std=true"], methods)
    with pytest.raises(ConfigError, match="neither an option of 'kd@ls'"):
        parse_method_options(["kd@ls:beta=2"], methods)


@pytest.mark.slow
def test_a_variant_trains_and_reports_apart_from_its_method(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "baseline,kd,kd@ls", "--models", "resnet8", "--teacher-model", "resnet8",
            "--teacher-epochs", "1", "--method-options", "kd@ls:logit_std=true", "--out", str(out),
            *[f"{k}={json.dumps(v)}" for k, v in TINY.items()], "teacher_min_accuracy=0"]
    assert main(argv) == 0
    recs = {load_run(p).label: load_run(p) for p in find_runs([out / "runs"])}
    assert set(recs) == {"baseline", "kd", "kd@ls"}
    assert recs["kd@ls"].summary["method"] == "kd" and recs["kd@ls"].config["options"] == {"logit_std": True}
    assert recs["kd"].config["options"] == {}
    report = (out / "report.md").read_text()
    assert "| kd@ls |" in report and "| kd |" in report
    assert {r["method"] for r in csv.DictReader((out / "results.csv").open())} == {"baseline", "kd", "kd@ls"}


# ---------------------------------------------------------------------------------------------- end to end
def test_mfkd_table_end_to_end_with_a_community_teacher(tmp_path, capsys):
    """The whole MFKD table at a tiny size: the vgg13 teacher is trained first, the resnet56 one is a
    RepDistiller file from --teachers-dir; every cell, teacher and published number is in the table."""
    data = write_cifar100(tmp_path / "data")
    teachers = tmp_path / "community" / "resnet56_vanilla"
    teachers.mkdir(parents=True)
    save_teacher(randomise(repdistiller("resnet56"), 3), teachers / "ckpt_epoch_240.pth")
    out = tmp_path / "t"
    argv = ["compare", "--table", "mfkd-cifar100", "--out", str(out), "--teachers-dir", str(tmp_path / "community"),
            *TINY_TABLE, f"data_dir={data}"]
    # one column first: its teacher and its grid only; the table lists the other column with '-'
    assert main([*argv, "--columns", "vgg13-vgg8"]) == 0, capsys.readouterr().err[-3000:]
    assert [p.name for p in (out / "columns").iterdir()] == ["vgg13-vgg8"]
    partial = (out / "table.md").read_text()
    assert "| MFKD | - (70.88) | " in partial and "| Teacher | - (72.34) | " in partial
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    check_every_cell(out, "mfkd-cifar100", community={"resnet56"})
    assert "| MFKD |" in captured.out and "wrote " in captured.out
    # the trained teacher ran once, for its column, with the teachers' epochs; the file teacher was not trained
    assert [p.name for p in (out / "teachers" / "runs").iterdir()] == ["vgg13"]
    assert json.loads((out / "teachers" / "runs" / "vgg13" / "baseline" / "s0" / "summary.json").read_text())[
        "epochs"] == 1
    student = yaml.safe_load((out / "columns" / "resnet56-resnet20" / "runs" / "resnet20" / "mfkd" / "s0" /
                              "config.yaml").read_text())
    assert student["teacher_model"] == "resnet56" and student["teacher_weights"].endswith("ckpt_epoch_240.pth")
    assert (student["epochs"], student["lr"], student["weight_decay"]) == (2, 0.05, 0.0005)  # preset + cpu + ours
    assert (out / "columns" / "vgg13-vgg8" / "report.md").is_file()
    # a second call trains nothing and writes the same table
    before = (out / "table.csv").read_text()
    assert main(argv) == 0
    assert "training ..." not in capsys.readouterr().err and (out / "table.csv").read_text() == before


@pytest.mark.slow
def test_the_repdistiller_table_end_to_end_at_a_tiny_size(tmp_path, capsys):
    """The main table (6 pairs, 5 teachers, 9 rows with the per-pair options) on test-written CIFAR-100."""
    data = write_cifar100(tmp_path / "data")
    out = tmp_path / "t"
    code = main(["compare", "--table", "cifar100-repdistiller", "--out", str(out), "--workers", "2",
                 "--threads", "1", *TINY_TABLE, "epochs=1", f"data_dir={data}"])
    assert code == 0, capsys.readouterr().err[-3000:]
    check_every_cell(out, "cifar100-repdistiller")
    assert sorted(p.name for p in (out / "teachers" / "runs").iterdir()) == [
        "resnet110", "resnet32x4", "resnet56", "vgg13", "wrn_40_2"]  # wrn_40_2 once for its two columns
    cfg = yaml.safe_load((out / "columns" / "resnet56-resnet20" / "runs" / "resnet20" / "dkd@ls" / "s0" /
                          "config.yaml").read_text())
    assert cfg["method"] == "dkd" and cfg["options"] == {"logit_std": True, "temperature": 3.0, "alpha": 18.0,
                                                         "beta": 36.0, "warmup_epochs": 1}
    cfg = yaml.safe_load((out / "columns" / "vgg13-vgg8" / "runs" / "vgg8" / "dkd" / "s0" / "config.yaml").read_text())
    assert cfg["options"] == {"beta": 6.0, "warmup_epochs": 1}


def test_a_failed_run_is_listed_and_the_command_fails(tmp_path, capsys):
    """MFKD needs more epochs than its fusion stage: its run fails, the others finish, the table says which."""
    data = write_cifar100(tmp_path / "data")
    out = tmp_path / "t"
    code = main(["compare", "--table", "mfkd-cifar100", "--out", str(out), "--columns", "vgg13-vgg8", *TINY_TABLE,
                 "epochs=1", f"data_dir={data}"])
    assert code == 1
    md = (out / "table.md").read_text()
    assert "## Failed runs" in md and "- vgg13->vgg8: [4/4] mfkd vgg8 seed 0" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| MFKD |"))
    assert "| MFKD | - (70.88) | - (73.71) |" == line
    assert next(ln for ln in md.splitlines() if ln.startswith("| KD |")).split("|")[3].strip() != "- (72.98)"


def test_a_failed_teacher_stops_the_table_in_one_line_before_any_student(tmp_path, capsys):
    """A teacher whose training diverges (lr=1e30: a non-finite loss) fails its run; no student is trained."""
    data = write_cifar100(tmp_path / "data")
    out = tmp_path / "t"
    code = main(["compare", "--table", "mfkd-cifar100", "--out", str(out), "--columns", "vgg13-vgg8", *TINY_TABLE,
                 "lr=1e30", f"data_dir={data}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "fusionkd compare: teacher run(s) failed, so no student of theirs was trained: [1/1] baseline vgg13" in err
    assert not (out / "columns").exists() and not (out / "table.md").exists()


@pytest.mark.parametrize("files", [{"table.md": "my notes\n"}, {"table.md": "x", "table.json": '{"mine": 1}'},
                                   {"table.csv": "a,b\n", "table.json": "not json"}])
def test_table_files_it_did_not_write_are_refused_before_any_work(tmp_path, capsys, files):
    out = tmp_path / "o"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert main(["compare", "--table", "mfkd-cifar100", "--out", str(out), *TINY_TABLE,
                 f"data_dir={tmp_path / 'nowhere'}"]) == 2
    assert "that no `fusionkd compare --table` wrote" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # untouched, nothing added
