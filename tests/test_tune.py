"""``fusionkd tune``: the search space, a real sqlite study killed (SIGKILL) mid-trial and resumed, the test
split never read, and the best settings accepted by ``train`` and ``compare``."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fusionkd.cli import main
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError, load_yaml, resolve_config

optuna = pytest.importorskip("optuna")

from fusionkd import tune as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: a tiny study: 1x16x16 synthetic images, 4 classes, 2 epochs per trial
TINY = ["dataset=synthetic", "dataset_options={num_classes: 4, in_chans: 1, train_size: 96, test_size: 32}",
        "image_size=16", "val_fraction=0.25", "batch_size=16", "eval_batch_size=64", "epochs=2", "threads=1",
        "model=wrn_16_1"]


def test_space_parsing_and_refusals():
    space = T.parse_space(["frskd:alpha=loguniform:0.5:4", "frskd:beta=int:10:200:10", "lr=loguniform:0.01:0.2",
                           "augment.cutout=choice:0,8"], "frskd")
    assert [p.key for p in space] == ["options.alpha", "options.beta", "lr", "augment.cutout"]
    assert (space[1].kind, space[1].low, space[1].high, space[1].step) == ("int", 10, 200, 10)
    assert space[3].choices == (0, 8)
    for bad, match in [("ffl:peers=int:2:4", "this study tunes 'frskd'"),
                       ("frskd:alpah=uniform:0:1", "neither an option of 'frskd'"),
                       ("lr=normal:0:1", "unknown distribution 'normal'"),
                       ("lr=loguniform:0:1", "LOW > 0"), ("lr=uniform:2:1", "LOW must be below HIGH"),
                       ("seed=int:0:3", "cannot be tuned"), ("frskd:beta=int:1.5:3", "integers")]:
        with pytest.raises(ConfigError, match=match):
            T.parse_space([bad], "frskd")
    with pytest.raises(ConfigError, match="empty"):
        T.parse_space([], "frskd")


def test_space_file_and_value_checks(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("frskd:alpha: loguniform:0.5:4\nbeta: {type: int, low: 10, high: 200}\n")
    space = T.parse_space([], "frskd", str(f))
    assert [p.describe() for p in space] == ["options.alpha=loguniform:0.5:4", "options.beta=int:10:200"]
    # every end of every distribution is validated like a config before anything starts
    spec = T.TuneSpec("frskd", T.parse_space(["lr=uniform:0.0:0.1"], "frskd"), tmp_path / "s",
                      common=T.parse_common(TINY))
    with pytest.raises(ConfigError, match=r"lr=uniform:0:0.1: the value 0.0 is refused: lr=0.0 is out of range"):
        T.check_spec(spec)
    spec = T.TuneSpec("frskd", space, tmp_path / "s", common=T.parse_common([*TINY, "val_fraction=0"]))
    with pytest.raises(ConfigError, match="val_fraction must be > 0"):
        T.check_spec(spec)
    assert not (tmp_path / "s").exists()


def _tune_cmd(out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fusionkd", "tune", "--method", "baseline", "--space",
            "lr=loguniform:0.01:0.2", "--trials", str(trials), "--out", str(out), "--pruner", "none", *TINY,
            *extra]


#: ``fusionkd tune`` that hangs (until killed) right after trial 1 finished its first epoch (its last.pt written)
HANG_IN_TRIAL_1 = r"""
import os, sys, threading
import fusionkd.tune as T
from fusionkd.cli import main

ready = sys.argv[1]
real = T.PruningCallback.on_epoch_end


def on_epoch_end(self, metrics):
    real(self, metrics)
    if self.trial.number == 1 and metrics["epoch"] == 1:
        with open(ready + ".tmp", "w") as f:
            f.write("trial 1, epoch 1")
        os.replace(ready + ".tmp", ready)
        threading.Event().wait()


T.PruningCallback.on_epoch_end = on_epoch_end
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_study_resumes_from_sqlite_after_a_kill(tmp_path, capsys):
    out = tmp_path / "study"
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HANG_IN_TRIAL_1, str(ready), *_tune_cmd(out, 3, "epochs=3")[3:]],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # kill it while trial 1 trains: a known state (trial 0 finished; trial 1 finished epoch 1 and hangs there),
    # waited for on the file it writes; the deadline only guards against a hang
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "trial 1 did not reach its first epoch's end"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(out / "trials" / "trial-0001" / "last.pt")["epoch"] == 1
    assert (out / "trials" / "trial-0000" / "summary.json").is_file()
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="study", storage=storage)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "RUNNING"]
    killed_lr = study.get_trials()[1].params["lr"]

    r = subprocess.run(_tune_cmd(out, 3, "epochs=3"), env=env, text=True, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trial 1 was interrupted" in r.stdout
    study = optuna.load_study(study_name="study", storage=storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params["lr"] == killed_lr and trials[2].user_attrs["retry_of"] == 1  # queued again
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == 3
    assert "trial 3 [3/3]" in r.stdout and "best so far" in r.stdout  # one progress line per trial
    # trial 0 was not trained again
    assert (out / "trials" / "trial-0000" / "train.log").read_text().count("loaded synthetic") == 1
    # the best settings are a config `train` accepts, and they hold the best trial's value
    best = load_yaml(out / "best.yaml")
    assert best["lr"] == study.best_trial.params["lr"] and best["method"] == "baseline"
    assert resolve_config(best).lr == best["lr"]
    # asking again for the same number of trials trains nothing (in this process: nothing is trained)
    assert main(_tune_cmd(out, 3, "epochs=3")[3:]) == 0
    assert "already holds 3 finished trial(s)" in capsys.readouterr().out
    # another setting under the same study name is refused, not mixed in
    assert main(_tune_cmd(out, 3, "epochs=5")[3:]) == 2
    assert "was started with other settings" in capsys.readouterr().err


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_the_test_split_is_never_read(tmp_path, capsys):
    data = tmp_path / "fashion-mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (120, 28, 28), dtype=np.uint8))
    _write_idx(data / "train-labels-idx1-ubyte.gz", (np.arange(120) % 10).astype(np.uint8))
    # the test files exist but are not IDX: reading them fails, so a study that read them would fail
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"not an IDX file")
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not an IDX file")
    common = [f"data_dir={data}", "val_fraction=0.25", "batch_size=30", "epochs=1", "threads=1", "model=wrn_16_1",
              "augment.crop_padding=0"]
    assert main(["train", "--method", "baseline", f"out_dir={tmp_path / 'runs'}", *common]) == 2
    assert "t10k-images-idx3-ubyte.gz" in capsys.readouterr().err  # train does read the test split
    out = tmp_path / "study"
    assert main(["tune", "--method", "frskd", "--space", "frskd:alpha=uniform:0.5:4", "--trials", "2",
                 "--out", str(out), *common]) == 0
    for trial in ("trial-0000", "trial-0001"):
        lines = [json.loads(x) for x in (out / "trials" / trial / "metrics.jsonl").read_text().splitlines()]
        assert lines and all("test" not in m and m["val"] for m in lines)
        summary = json.loads((out / "trials" / trial / "summary.json").read_text())
        assert summary["data"]["test"] == 0


def test_best_settings_are_accepted_by_compare(tmp_path):
    from fusionkd.compare.grid import CompareSpec, plan

    out = tmp_path / "study"
    assert main(["tune", "--method", "frskd", "--space", "frskd:beta=int:10:200", "lr=loguniform:0.01:0.2",
                 "--trials", "1", "--out", str(out), *TINY, "epochs=1"]) == 0
    best = load_yaml(out / "best-compare.yaml")
    tuned = best["method_options"]["frskd"]
    assert set(tuned) == {"beta", "lr"} and "model" not in best  # model/threads are compare's own flags
    _, tasks = plan(CompareSpec(methods=["baseline", "frskd"], models=["wrn_16_1"], seeds=[0], out=tmp_path / "c",
                                config_file=str(out / "best-compare.yaml")))
    cfgs = {t.method: t.config for t in tasks}
    assert cfgs["frskd"].options["beta"] == tuned["beta"] and cfgs["frskd"].lr == tuned["lr"]
    assert cfgs["baseline"].options == {} and cfgs["baseline"].lr == 0.1  # the tuned values are frskd's only
    assert cfgs["baseline"].epochs == 1 and cfgs["baseline"].image_size == 16  # the common settings apply to all
    md = (out / "tune.md").read_text()
    assert "fusionkd tune --method frskd --space frskd:beta=int:10:200" in md and "| 0 | complete |" in md


def test_a_study_whose_trials_keep_failing_stops_with_the_reason(tmp_path, capsys):
    # every lr in this range makes the loss overflow: three failed trials, then a clear stop (not a loop)
    args = ["tune", "--method", "baseline", "--space", "lr=loguniform:1e30:1e31", "--trials", "5", "--out",
            str(tmp_path / "s"), *TINY, "epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "3 trials in a row failed" in err and "NaN" in err


def test_a_study_on_a_store_runs_and_reads_no_test_image(tmp_path, capsys):
    """A dataset read from a store (imagefolder, storage=store) used to crash every trial: the empty test
    split was built from ``.images``, which a store split does not have."""
    from test_data_datasets import write_png_tree

    root = tmp_path / "folder"
    write_png_tree(root, {"train": 12, "test": 4}, ["a", "b"], size=(16, 16))
    out = tmp_path / "study"
    code = main(["tune", "--method", "baseline", "--space", "lr=loguniform:0.01:0.2", "--trials", "2", "--out",
                 str(out), "--pruner", "none", "dataset=imagefolder", f"data_dir={root}", "image_size=16",
                 "dataset_options={storage: store, store_dir: %s}" % (tmp_path / "store"), "val_fraction=0.25",
                 "batch_size=4", "eval_batch_size=16", "epochs=1", "threads=1", "model=resnet8"])
    assert code == 0, capsys.readouterr().err
    summaries = sorted((out / "trials").glob("trial-*/summary.json"))
    assert len(summaries) == 2
    for f in summaries:
        assert "'test': 0}" in (f.parent / "train.log").read_text()  # the trial's data sizes: no test image
        assert not json.loads(f.read_text())["best"].get("test")  # and nothing was evaluated on test
    # the store was prepared with every split (later train/compare runs share it), test included
    manifest = json.loads(next((tmp_path / "store").rglob("manifest.json")).read_text())
    assert "test" in json.dumps(manifest["splits"] if "splits" in manifest else manifest)
