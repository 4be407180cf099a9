"""fusionkd never deletes or overwrites a file it cannot prove it created.

Every path that clears or removes a run folder (a fresh start into an existing folder, a restart of a run that
never finished an epoch, ``--overwrite``, the clean-up after a refused input, resume's repairs, ``compare``'s
re-runs) is run for real against a folder holding a user's file and against a folder holding other finished
runs; the user's bytes and the other runs' checkpoints must come out unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusionkd
from fusionkd.cli import main
from fusionkd.engine.checkpoint import CheckpointError, load_checkpoint
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.engine.rundir import LOCK_NAME, MARKER_NAME
from fusionkd.models import WeightsError, read_state_dict

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fault_worker.py")
TINY = dict(
    method="baseline", model="resnet20", dataset="synthetic",
    dataset_options={"num_classes": 3, "in_chans": 1, "train_size": 48, "test_size": 24},
    image_size=8, val_fraction=0.25, batch_size=12, eval_batch_size=64, epochs=1, lr=0.01,
    progress="none", threads=1,
)


def train(out: Path, name: str | None, **kw):
    return fusionkd.train(**{**TINY, "out_dir": str(out), "name": name, **kw})


def cli_config(tmp_path: Path, out: Path, name: str | None, **kw) -> str:
    p = tmp_path / f"cfg-{os.urandom(3).hex()}.yaml"
    p.write_text(resolve_config({**TINY, "out_dir": str(out), "name": name, **kw}).to_yaml())
    return str(p)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones included) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tmp_path):
    """``runs/precious`` holding a user's thesis."""
    d = tmp_path / "runs" / "precious"
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("four years of work\n")
    return d


# ------------------------------------------------------------------- a folder holding a user's file
def test_fresh_run_into_a_user_folder_is_refused_and_touches_nothing(tmp_path, user_folder, capsys):
    code = main(["train", "--config", cli_config(tmp_path, tmp_path / "runs", "precious")])
    err = capsys.readouterr().err
    assert code == 2
    assert "precious" in err and "thesis.tex" in err and "not a run folder fusionkd made" in err
    assert sorted(os.listdir(user_folder)) == ["thesis.tex"]  # not even a lock file or a marker was added
    assert (user_folder / "thesis.tex").read_text() == "four years of work\n"


def test_overwrite_never_deletes_a_user_folder(tmp_path, user_folder, capsys):
    code = main(["train", "--overwrite", "--config", cli_config(tmp_path, tmp_path / "runs", "precious")])
    assert code == 2
    assert "--overwrite included" in capsys.readouterr().err
    assert sorted(os.listdir(user_folder)) == ["thesis.tex"]


def test_refused_input_into_a_user_folder_deletes_nothing(tmp_path, user_folder, capsys):
    # the report: a refused run (batch larger than the data) used to delete the whole folder
    code = main(["train", "--config", cli_config(tmp_path, tmp_path / "runs", "precious", batch_size=100000)])
    assert code == 2
    assert sorted(os.listdir(user_folder)) == ["thesis.tex"]


def test_api_refuses_a_user_folder_too(tmp_path, user_folder):
    with pytest.raises(ConfigError, match="thesis.tex"):
        train(tmp_path / "runs", "precious", overwrite=True)
    assert sorted(os.listdir(user_folder)) == ["thesis.tex"]


def test_a_user_file_added_to_a_finished_run_survives_overwrite(tmp_path):
    runs = tmp_path / "runs"
    train(runs, "r")
    d = runs / "r"
    (d / "notes.md").write_text("my notes\n")
    before = snapshot(d)
    with pytest.raises(ConfigError, match=r"notes\.md.*fusionkd did not write.*--overwrite included"):
        train(runs, "r", overwrite=True)
    assert snapshot(d) == before


def test_a_user_file_in_a_run_that_never_finished_an_epoch_survives_the_restart(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="batch_size"):  # refused after the folder was made...
        train(runs, "r", batch_size=100000)
    assert not runs.exists()  # ...and the folders this call made are gone again
    # a run that stopped before its first epoch ended: marked, config.yaml and train.log only
    d = runs / "r"
    d.mkdir(parents=True)
    (d / MARKER_NAME).write_text("{}\n")
    (d / "config.yaml").write_text(resolve_config({**TINY, "out_dir": str(runs), "name": "r"}).to_yaml())
    (d / "train.log").write_text("started\n")
    (d / "draft.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match="draft.txt"):
        train(runs, "r")
    assert (d / "draft.txt").read_text() == "mine\n" and (d / "config.yaml").exists()
    (d / "draft.txt").unlink()
    train(runs, "r")  # only fusionkd's files: restarted from epoch 1
    assert (d / "summary.json").is_file() and (d / "train.log").read_text().count("started\n") == 0


# --------------------------------------------------------------- a folder holding other finished runs
def test_a_run_named_after_the_parent_of_finished_runs_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    train(runs, None)  # runs/synthetic/baseline-resnet20-s0
    parent = runs / "synthetic"
    before = snapshot(parent)
    for extra in ([], ["--overwrite"]):
        code = main(["train", *extra, "--config", cli_config(tmp_path, runs, "synthetic", method="dml")])
        err = capsys.readouterr().err
        assert code == 2
        assert "baseline-resnet20-s0/ (a fusionkd run)" in err
        assert snapshot(parent) == before  # the child run's checkpoints are byte for byte the same


def test_overwrite_of_a_run_with_another_run_inside_is_refused(tmp_path):
    runs = tmp_path / "runs"
    train(runs, "a")
    train(runs, "a/inner")
    before = snapshot(runs / "a")
    with pytest.raises(ConfigError, match="inner/ \\(a fusionkd run\\)"):
        train(runs, "a", overwrite=True)
    assert snapshot(runs / "a") == before


def test_overwrite_replaces_a_clean_fusionkd_run(tmp_path):
    runs = tmp_path / "runs"
    train(runs, "r")
    first = load_checkpoint(runs / "r" / "last.pt")["run"]
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(runs, "r")
    train(runs, "r", overwrite=True, seed=1)
    d = runs / "r"
    assert (d / MARKER_NAME).is_file()
    assert load_checkpoint(d / "last.pt")["config"]["seed"] == 1
    assert load_checkpoint(d / "last.pt")["run"] != first


# ------------------------------------------------------------------------------ refusals clean up
def test_a_refused_run_removes_only_what_it_made(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match="batch_size"):
        train(out, "new/deeper/run", batch_size=100000)
    assert not out.exists()  # the run folder and the parents this call made
    empty = tmp_path / "mine"
    empty.mkdir()
    with pytest.raises(ConfigError, match="batch_size"):
        fusionkd.train(**{**TINY, "out_dir": str(tmp_path), "name": "mine", "batch_size": 100000})
    assert empty.is_dir() and os.listdir(empty) == []  # the user's empty folder stays, emptied of our files


def test_resume_removes_only_fusionkd_temporary_files(tmp_path):
    runs = tmp_path / "runs"
    fusionkd.train(**{**TINY, "out_dir": str(runs), "name": "r", "epochs": 2}, stop_after=1)
    d = runs / "r"
    (d / ".last.pt.ab12cd_x.tmp").write_bytes(b"half a checkpoint")
    (d / ".notes.tmp").write_text("the user's\n")
    (d / "scratch.tmp").write_text("the user's too\n")
    fusionkd.resume(d)
    assert not (d / ".last.pt.ab12cd_x.tmp").exists()
    assert (d / ".notes.tmp").read_text() == "the user's\n" and (d / "scratch.tmp").exists()


def test_a_folder_from_before_the_marker_resumes_but_is_not_replaced(tmp_path, capsys):
    runs = tmp_path / "runs"
    fusionkd.train(**{**TINY, "out_dir": str(runs), "name": "old", "epochs": 2}, stop_after=1)
    d = runs / "old"
    (d / MARKER_NAME).unlink()  # as an older fusionkd left it
    before = snapshot(d)
    code = main(["train", "--overwrite", "--config", cli_config(tmp_path, runs, "old", epochs=2)])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert snapshot(d) == before
    fusionkd.resume(d)  # its checkpoint proves it fusionkd's: resumed and marked
    assert (d / "summary.json").is_file() and (d / MARKER_NAME).is_file()


def test_a_symlink_in_the_name_may_not_lead_outside_out_dir(tmp_path, capsys):
    out, outside = tmp_path / "runs", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="leads outside out_dir"):
        resolve_config({**TINY, "out_dir": str(out), "name": "link/x"})
    code = main(["train", "--dataset", "synthetic", "--out-dir", str(out), "name=link/x", "epochs=1"])
    assert code == 2 and "resolves to" in capsys.readouterr().err
    assert os.listdir(outside) == []


# ------------------------------------------------------------------------ compare re-runs a folder
def test_compare_never_clears_a_user_folder_in_its_output(tmp_path):
    out = tmp_path / "cmp"
    run = out / "runs" / "resnet20" / "baseline" / "s0"
    run.mkdir(parents=True)
    (run / "thesis.tex").write_text("mine\n")
    common = tmp_path / "common.yaml"
    common.write_text(json.dumps({k: v for k, v in TINY.items() if k not in ("method", "model")}))
    r = subprocess.run([sys.executable, "-m", "fusionkd", "compare", "--methods", "baseline", "--seeds", "0",
                        "--out", str(out), "--config", str(common)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "thesis.tex" in r.stdout + r.stderr
    assert sorted(os.listdir(run)) == ["thesis.tex"]  # no error.log, no lock, no marker written into it
    assert (run / "thesis.tex").read_text() == "mine\n"


# ------------------------------------------------------------------------------ the epoch-1 window
def test_eval_of_best_pt_in_the_window_before_the_first_best_pt(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    cfg = resolve_config({**TINY, "out_dir": str(tmp_path), "name": "r", "epochs": 3}).to_dict()
    spec.write_text(json.dumps({"config": cfg, "kill": {"file": "best.pt", "when": "before", "nth": 1}}))
    r = subprocess.run([sys.executable, str(WORKER), str(spec)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr  # a real SIGKILL between last.pt and best.pt of epoch 1
    d = tmp_path / "r"
    assert (d / "last.pt").is_file() and not (d / "best.pt").exists()
    assert main(["eval", str(d / "best.pt")]) == 0
    assert "synthetic test (24 images)" in capsys.readouterr().out
    assert load_checkpoint(d / "best.pt")["epoch"] == 1


# ------------------------------------------------------------------------- non-finite weights
def test_nan_weights_are_refused_where_they_are_read(tmp_path, capsys):
    net = fusionkd.models.create_model("resnet20", num_classes=3, in_chans=1)
    sd = net.state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 4)
    sd[key][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=f"non-finite.*{key}"):
        read_state_dict(path)
    code = main(["train", "--config", cli_config(tmp_path, tmp_path / "runs", "w", weights=str(path))])
    assert code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "runs" / "w").exists()


def test_a_teacher_checkpoint_with_inf_weights_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    train(runs, "t")
    ckpt = torch.load(runs / "t" / "best.pt", map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["deploy"]["state_dict"].items() if v.is_floating_point())
    ckpt["deploy"]["state_dict"][name].fill_(float("inf"))
    bad = tmp_path / "teacher.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=f"non-finite.*{name}"):
        load_checkpoint(bad)
    code = main(["train", "--config", cli_config(tmp_path, runs, "s", method="kd", teacher=str(bad))])
    assert code == 2 and "non-finite" in capsys.readouterr().err
    assert not (runs / "s").exists()


def test_the_marker_and_lock_are_the_only_additions_to_a_new_run(tmp_path):
    runs = tmp_path / "runs"
    train(runs, "r")
    names = set(os.listdir(runs / "r"))
    assert {MARKER_NAME, LOCK_NAME, "config.yaml", "last.pt", "best.pt", "summary.json", "metrics.jsonl",
            "train.log"} == names


# ------------------------------------------------------------------------------------- export
def test_export_never_writes_over_files_it_did_not_make(tmp_path, capsys):
    runs = tmp_path / "runs"
    train(runs, "r")
    d = runs / "r"
    before = snapshot(d)
    # --out d/best.pt2 would put the deploy file at d/best.pt: the training checkpoint it reads
    assert main(["export", str(d / "best.pt"), "--out", str(d / "best.pt2")]) == 2
    assert "over the checkpoint it reads" in capsys.readouterr().err
    assert snapshot(d) == before
    mine = tmp_path / "student.pt"
    mine.write_bytes(b"my own weights")
    assert main(["export", str(d / "best.pt"), "--out", str(tmp_path / "student.pt2")]) == 2
    assert "student.pt" in capsys.readouterr().err and mine.read_bytes() == b"my own weights"
    # an earlier export's files are replaced
    out = tmp_path / "exp" / "net.pt2"
    assert main(["export", str(d / "best.pt"), "--out", str(out)]) == 0
    assert main(["export", str(d / "best.pt"), "--out", str(out)]) == 0
    assert load_checkpoint(out.with_suffix(".pt"))["format"].endswith("-deploy")


# ------------------------------------------------------------------- checked before the data is read
def test_a_missing_teacher_file_is_refused_before_the_data_is_read(tmp_path, capsys):
    code = main(["train", "--config", cli_config(tmp_path, tmp_path / "runs", "s", method="kd",
                                                  teacher=str(tmp_path / "nope" / "best.pt"))])
    err = capsys.readouterr().err
    assert code == 2 and "no such checkpoint" in err
    assert "loaded synthetic" not in err and not (tmp_path / "runs").exists()


def test_plugin_flag_is_repeatable(tmp_path, capsys):
    # argparse used to prefix-match --plugin to --plugins, so each repetition replaced the previous one
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from fusionkd.models import register_model\n"
                 "from fusionkd.models.resnet import resnet8\n"
                 "register_model('net_a', 'a')(lambda num_classes, in_chans, **kw: resnet8(num_classes, in_chans))\n")
    b.write_text(a.read_text().replace("net_a", "net_b").replace("'a'", "'b'"))
    assert main(["train", "--plugin", str(a), "--plugin", str(b), "--dataset", "synthetic", "--model", "net_b",
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert str(a) in printed and str(b) in printed and "model: net_b" in printed
    with pytest.raises(SystemExit):
        main(["train", "--plug", str(a), "--print-config"])  # no silent prefix matching any more


def test_a_cifar_stem_network_on_large_images_gets_a_warning(tmp_path, caplog):
    from fusionkd.engine.trainer import warn_small_stride
    from fusionkd.models import create_model

    assert not warn_small_stride(create_model("imagenet_resnet18", 10, 3), "imagenet_resnet18", 224)
    assert not warn_small_stride(create_model("resnet20", 10, 3), "resnet20", 32)
    with caplog.at_level("WARNING", logger="fusionkd"):
        train(tmp_path, "big", model="resnet8", image_size=128, batch_size=4,
              dataset_options={"num_classes": 2, "in_chans": 1, "train_size": 8, "test_size": 4})
    warned = [r.getMessage() for r in caplog.records if "CIFAR stem" in r.getMessage()]
    assert len(warned) == 1 and "last map is 32x32 where an ImageNet-stem network's is 4x4" in warned[0]


def test_a_folder_being_marked_by_another_process_is_reported_as_in_use(tmp_path):
    """Two runs of one name started together: the second used to see the first's half-written marker and
    call the folder 'not a run folder fusionkd made' instead of naming the process that holds it."""
    from fusionkd.engine.rundir import RunLock, RunLockedError
    from fusionkd.engine.trainer import Trainer

    d = tmp_path / "runs" / "r"
    cfg = resolve_config({**TINY, "out_dir": str(tmp_path / "runs"), "name": "r"})
    with RunLock(d):
        (d / f".{MARKER_NAME}.abc123.tmp").write_text("{}")  # the first process, inside mark()
        trainer = Trainer(cfg)  # the early check lets it through to the lock...
        with pytest.raises(RunLockedError, match="in use by another fusionkd process"):
            trainer.fit()  # ...which names the holder
    assert (d / f".{MARKER_NAME}.abc123.tmp").exists()


def test_a_link_to_a_fusionkd_run_folder_is_followed(tmp_path):
    # the protocol script shares baseline runs between families by symlink: allowed, since the link leads to a
    # run folder fusionkd made; a link to anything else stays refused
    shared = tmp_path / "shared"
    train(shared, "base")
    out = tmp_path / "family"
    out.mkdir()
    (out / "base").symlink_to(shared / "base", target_is_directory=True)
    cfg = resolve_config({**TINY, "out_dir": str(out), "name": "base"})
    assert cfg.run_dir.resolve() == (shared / "base").resolve()
    (shared / "plain").mkdir()
    (out / "plain").symlink_to(shared / "plain", target_is_directory=True)
    with pytest.raises(ConfigError, match="leads outside out_dir"):
        resolve_config({**TINY, "out_dir": str(out), "name": "plain"})
