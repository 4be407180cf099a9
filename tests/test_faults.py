"""Fault injection: kill -9 between every pair of writes of an epoch end, concurrent runs, bad numbers, stuck
runs, partial data folders, full and read-only disks, foreign and damaged checkpoints.

Kills are real ``SIGKILL``s of a training subprocess (``tests/fault_worker.py``) at a chosen write; the run is
then resumed and must end bit-identical to an uninterrupted run, with ``best.pt``, ``last.pt``,
``metrics.jsonl`` and ``summary.json`` agreeing and no temporary file left behind.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import fusionkd
from fusionkd.cli import main
from fusionkd.data import DataFormatError, DatasetNotFoundError, load_dataset
from fusionkd.data.formats import read_idx
from fusionkd.engine import checkpoint as ck
from fusionkd.engine.checkpoint import CheckpointError, StorageError, load_checkpoint
from fusionkd.engine.config import RANGES, ConfigError, numeric_fields, resolve_config
from fusionkd.engine.rundir import RunLock, RunLockedError
from fusionkd.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fault_worker.py")
EPOCHS = 4
RUN = dict(
    method="baseline", model="resnet20", dataset="synthetic",
    dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 128, "test_size": 40},
    image_size=16, val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=EPOCHS, lr=0.01,
    progress="none", threads=1,
)


def run_config(out: Path, name: str, **kw) -> dict:
    return {**RUN, "out_dir": str(out), "name": name, **kw}


def worker(tmp_path: Path, spec: dict, *, wait: bool = True, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    path = tmp_path / f"spec-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), str(path)]
    if not wait:
        return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)


def state(path: Path) -> dict:
    """A checkpoint file as written (no redirection), for comparisons."""
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (in a subprocess, like the killed ones) and the epochs at which it wrote best.pt."""
    tmp = tmp_path_factory.mktemp("ref")
    r = worker(tmp, {"config": run_config(tmp, "ref"), "kill": None})
    assert r.returncode == 0, r.stderr
    run = tmp / "ref"
    lines = metrics(run)
    best_writes, best = [], -1.0
    for m in lines:
        if m["val"]["net"] > best:
            best, best_writes = m["val"]["net"], [*best_writes, m["epoch"]]
    return {"dir": run, "best_writes": best_writes, "summary": json.loads((run / "summary.json").read_text())}


def kill_points(ref: dict) -> list[tuple[str, str, int]]:
    n_best = len(ref["best_writes"])
    last_best_epoch = ref["best_writes"][-1]
    return [
        ("config.yaml", "after", 1),     # dies in epoch 1: nothing finished yet (stuck run)
        ("metrics.jsonl", "temp", 2),    # half a metrics line written
        ("metrics.jsonl", "after", 2),   # metrics line written, last.pt not
        ("last.pt", "temp", 2),          # last.pt's temp file complete, not renamed
        ("last.pt", "after", last_best_epoch),  # between last.pt and best.pt of a best epoch
        ("best.pt", "temp", n_best),     # best.pt's temp file complete, not renamed
        ("best.pt", "after", n_best),    # both written, next epoch not started
        ("last.pt", "after", EPOCHS),    # final epoch written, summary not (if the last epoch is not a best one)
        ("summary.json", "temp", 1),     # summary half-done
    ]


SCENARIOS = [f"{i}" for i in range(9)]


def check_like_reference(run: Path, ref: dict) -> None:
    a, b = state(ref["dir"] / "last.pt")["method_state"], state(run / "last.pt")["method_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"] == ref["summary"]["best"] and summary["last"] == ref["summary"]["last"]
    best = state(run / "best.pt")
    assert best["epoch"] == summary["best"]["epoch"]
    ref_best = state(ref["dir"] / "best.pt")["method_state"]
    assert all(torch.equal(best["method_state"][k], ref_best[k]) for k in ref_best)
    lines = metrics(run)
    assert [m["epoch"] for m in lines] == list(range(1, EPOCHS + 1))
    assert [m.get("test") for m in lines] == [m.get("test") for m in metrics(ref["dir"])]
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
    with RunLock(run):  # the lock is free again
        pass


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kill_between_writes_then_resume_is_exact(tmp_path, reference, scenario):
    file, when, nth = kill_points(reference)[int(scenario)]
    run = tmp_path / "run"
    r = worker(tmp_path, {"config": run_config(tmp_path, "run"), "kill": {"file": file, "when": when, "nth": nth}})
    if r.returncode == 0:  # this write never happened in this run (e.g. the last epoch is also a best one)
        assert file == "last.pt" and nth == EPOCHS, (file, when, nth)
    else:
        assert r.returncode == -signal.SIGKILL, r.stderr
    if (run / "last.pt").is_file():
        last = state(run / "last.pt")
        # what any reader sees: best.pt always holds the epoch that last.pt records as best
        assert load_checkpoint(run / "best.pt")["epoch"] == last["best"]["epoch"]
        fusionkd.resume(run)
    else:  # no epoch finished: the same command again starts it over (no --resume needed, nothing lost)
        fusionkd.train(**run_config(tmp_path, "run"))
    check_like_reference(run, reference)


@pytest.mark.slow
def test_stuck_run_resumes_from_epoch_one(tmp_path, reference):
    run = tmp_path / "run"
    r = worker(tmp_path, {"config": run_config(tmp_path, "run"), "kill": {"file": "last.pt", "when": "before",
                                                                          "nth": 1}})
    assert r.returncode == -signal.SIGKILL
    assert not (run / "last.pt").exists() and (run / "config.yaml").exists()
    assert main(["train", "--resume", str(run)]) == 0
    check_like_reference(run, reference)
    out = fusionkd.resume(run)  # a finished run is not trained again
    assert out.summary == json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------------- concurrency
def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    holder = worker(tmp_path, {"hold_lock": str(run)}, wait=False, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"PID {holder.pid}\b"):
            fusionkd.train(**run_config(tmp_path, "run", epochs=1))
        assert main(["train", "--config", _yaml(tmp_path, run_config(tmp_path, "run", epochs=1))]) == 2
        # a run that exists: --resume is refused too, and nothing in the folder was touched
        holder_files = sorted(p.name for p in run.iterdir())
        (run / "config.yaml").write_text(resolve_config(run_config(tmp_path, "run", epochs=1)).to_yaml())
        with pytest.raises(RunLockedError, match="in use by another fusionkd process"):
            fusionkd.resume(run)
        assert sorted(p.name for p in run.iterdir()) == sorted({*holder_files, "config.yaml"})
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    result = fusionkd.resume(run)  # the stored config now trains from epoch 1
    assert result.summary["finished"]


def _yaml(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(resolve_config(cfg).to_yaml())
    return str(p)


@pytest.mark.slow
def test_two_cli_runs_of_one_name_started_together(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cfg = _yaml(tmp_path, run_config(tmp_path, "same", epochs=2))
    cmd = [sys.executable, "-m", "fusionkd", "train", "--config", cfg]
    procs = [subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(o[1] for p, o in zip(procs, outs) if p.returncode == 2)
    assert "in use by another fusionkd process" in err or "already holds a finished run" in err
    assert [m["epoch"] for m in metrics(tmp_path / "same")] == [1, 2]


# ---------------------------------------------------------------------- bad numbers
BAD = [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("lr", -0.1), ("momentum", float("nan")),
    ("momentum", 1.0), ("momentum", -0.5), ("weight_decay", float("nan")), ("weight_decay", -1e-4),
    ("grad_clip", float("nan")), ("grad_clip", -1.0), ("grad_clip", 0.0), ("warmup_epochs", float("nan")),
    ("warmup_epochs", -1.0), ("warmup_epochs", 100.0), ("gamma", -1.0), ("gamma", 0.0), ("gamma", 2.0),
    ("gamma", float("inf")), ("val_fraction", float("nan")), ("val_fraction", -0.1), ("epochs", 0),
    ("batch_size", 0), ("eval_batch_size", -1), ("eval_every", 0), ("log_every", -1), ("threads", 0),
    ("seed", -1), ("data_seed", -3), ("subset", 0), ("image_size", 0), ("image_size", 2),
    ("augment.cutout", 40), ("augment.cutout", -1), ("augment.crop_padding", -2), ("augment.crop_padding", 29),
    ("name", "../../x"), ("name", "/etc/x"), ("name", ""), ("name", "a/../../b"), ("device", "cuda"),
]


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_bad_numbers_are_refused_before_anything_is_created(tmp_path, key, value):
    if key == "device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    before = set(tmp_path.iterdir())
    with pytest.raises(ConfigError) as e:
        resolve_config({"dataset": "fashion-mnist", "epochs": 10, "out_dir": str(tmp_path), key: value})
    assert key.split(".")[-1] in str(e.value)
    assert set(tmp_path.iterdir()) == before


def test_every_numeric_config_key_has_a_range():
    assert set(numeric_fields()) <= set(RANGES), set(numeric_fields()) - set(RANGES)


#: method options that may legitimately be negative (stage indices counted from the end); whether such an
#: index exists depends on the networks, so it is checked when the method is built (before the first step,
#: and a refusal removes the run folder it made)
NEGATIVE_OK = {("fitnet", "student_stage"), ("fitnet", "teacher_stage"), ("mfkd", "taps")}


def _numeric_options():
    for entry in METHODS.entries():
        cls = entry.obj.Options
        hints = __import__("typing").get_type_hints(cls)
        for f in fields(cls):
            tp = str(hints[f.name])
            if ("float" in tp or "int" in tp) and "list" not in tp:
                yield entry.name, f.name, "float" in tp


OPTIONS = list(_numeric_options())


@pytest.mark.parametrize(("method", "option", "is_float"), OPTIONS, ids=[f"{m}.{o}" for m, o, _ in OPTIONS])
def test_every_numeric_method_option_has_its_range_checked(method, option, is_float):
    extra = {"teacher": "t.pt"} if METHODS.get(method).needs_teacher else {}
    bad_values = [-1, -1000] if (method, option) not in NEGATIVE_OK else []
    if is_float:
        bad_values += [float("nan"), float("inf"), float("-inf")]
    for value in bad_values:
        with pytest.raises(ConfigError, match=option):
            resolve_config({"method": method, "options": {option: value}, **extra})


# ---------------------------------------------------------------------- refusals that need the data
@pytest.mark.parametrize("bad", [{"batch_size": 500}, {"subset": 100_000}])
def test_data_dependent_refusals_leave_no_run_folder(tmp_path, bad):
    with pytest.raises((ConfigError, ValueError)):
        fusionkd.train(**run_config(tmp_path, "r", **bad))
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- data folders
def _write_idx(path: Path, arr: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _fmnist_files(folder: Path, skip: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, arr in (("train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)),
                      ("train-labels-idx1-ubyte", (np.arange(20) % 10).astype(np.uint8)),
                      ("t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28), dtype=np.uint8)),
                      ("t10k-labels-idx1-ubyte", (np.arange(10) % 10).astype(np.uint8))):
        if stem != skip:
            _write_idx(folder / f"{stem}.gz", arr)


def test_a_given_data_dir_is_used_or_refused_never_replaced(tmp_path, monkeypatch):
    # a complete copy elsewhere (where the search would look without data_dir)
    monkeypatch.setenv("FUSIONKD_DATA", str(tmp_path / "elsewhere"))
    _fmnist_files(tmp_path / "elsewhere" / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", val_fraction=0).train) == 20
    _fmnist_files(tmp_path / "mine", skip="t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", tmp_path / "mine", val_fraction=0)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", tmp_path / "empty", val_fraction=0)
    _fmnist_files(tmp_path / "mine")
    assert len(load_dataset("fashion-mnist", tmp_path / "mine", val_fraction=0).test) == 10


def test_a_huge_idx_header_is_reported_with_a_positive_size(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31) + b"\0" * 16)
    with pytest.raises(DataFormatError) as e:
        read_idx(p)
    assert f"{2**93} bytes" in str(e.value) and "-" not in str(e.value).split("=")[-1].split("bytes")[0]


# ---------------------------------------------------------------------- full and read-only disks
def test_disk_full_is_a_clear_error_and_nothing_written_is_damaged(tmp_path, monkeypatch):
    first = fusionkd.train(**run_config(tmp_path, "run", epochs=3), stop_after=1)
    before = state(first.run_dir / "last.pt")
    writes = {"n": 0}
    real = ck._raw_write

    def full(f, data):
        writes["n"] += 1
        if writes["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, data)

    monkeypatch.setattr(ck, "_raw_write", full)
    with pytest.raises(StorageError, match="the disk is full") as e:
        fusionkd.resume(first.run_dir)
    msg = str(e.value)
    assert re.fullmatch(
        rf"cannot write '{re.escape(str(first.run_dir))}/[^']*last\.pt[^']*': the disk is full \([\d,.]+ MiB free "
        r"there\)\. Nothing already written was damaged \(files are replaced only once the new version is "
        r"complete\); free some space, then run the same command again \(or --resume the run\)", msg), msg
    monkeypatch.undo()
    assert state(first.run_dir / "last.pt")["epoch"] == before["epoch"] == 1
    assert not list(first.run_dir.glob(".*.tmp"))
    assert fusionkd.resume(first.run_dir).summary["finished"]  # space freed: the run finishes


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected-fault tests cover it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_disk_through_the_cli(tmp_path, capsys):
    with _tmpfs(tmp_path / "small", "size=256k") as small:
        code = main(["train", "--config", _yaml(tmp_path, run_config(small, "run", epochs=1))])
        err = capsys.readouterr().err
        assert code == 2 and "the disk is full" in err and "Traceback" not in err, err
        assert not list((small / "run").glob(".*.tmp"))


def test_a_read_only_output_folder_through_the_cli(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        code = main(["train", "--config", _yaml(tmp_path, run_config(ro, "run", epochs=1))])
        err = capsys.readouterr().err
        assert code == 2 and "read-only" in err and "Errno" not in err, err


def test_permission_errors_are_named(tmp_path, monkeypatch):
    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(StorageError, match="permission denied"):
        fusionkd.train(**run_config(tmp_path, "run", epochs=1))


# ---------------------------------------------------------------------- foreign and damaged checkpoints
def test_a_foreign_last_pt_is_refused(tmp_path):
    a = fusionkd.train(**run_config(tmp_path, "a", epochs=2), stop_after=1)
    b = fusionkd.train(**run_config(tmp_path, "b", epochs=2, seed=1), stop_after=1)
    shutil.copy(a.run_dir / "last.pt", b.run_dir / "last.pt")
    with pytest.raises(CheckpointError, match=r"does not belong to this run folder.*seed"):
        fusionkd.resume(b.run_dir)


def test_damaged_checkpoints_are_clear_errors(tmp_path, capsys):
    r = fusionkd.train(**run_config(tmp_path, "a", epochs=1))
    c = state(r.run_dir / "best.pt")
    c["method_state"]["net.head.fc.weight"] = torch.zeros(7, 64)
    c["deploy"]["state_dict"]["head.fc.weight"] = torch.zeros(7, 64)
    torch.save(c, tmp_path / "mismatch.pt")
    assert main(["eval", str(tmp_path / "mismatch.pt")]) == 2
    err = capsys.readouterr().err
    assert "head.fc.weight: (7, 64) in the file vs (4, 64)" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match=r"head.fc.weight: \(7, 64\)"):
        ck.build_deploy_model(c)
    c = state(r.run_dir / "best.pt")
    c["epoch"] = "three"
    torch.save(c, tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="field 'epoch' is 'three'"):
        load_checkpoint(tmp_path / "text.pt")
