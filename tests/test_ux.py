"""What a person sees: the progress bar on a real pseudo-terminal, the live worker lines of compare, the
CLI's argument handling, --print-config, export without --onnx, list order, eval's confusion header, the
API's logging, the compact compare table."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fusionkd
from fusionkd.cli import main

SRC = str(Path(fusionkd.__file__).resolve().parents[1])
TINY_ARGS = ["--dataset", "synthetic", "image_size=16", "val_fraction=0.25", "batch_size=16",
             "eval_batch_size=64", "epochs=2", "threads=1",
             "dataset_options={num_classes: 4, in_chans: 1, train_size: 64, test_size: 32}"]
TINY = dict(method="baseline", model="resnet20", dataset="synthetic", image_size=16, val_fraction=0.25,
            batch_size=16, eval_batch_size=64, epochs=2, threads=1,
            dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 32})


def run_in_pty(argv: list[str], cwd: Path, timeout: float = 240.0) -> tuple[int, str]:
    """Run ``python -m fusionkd ARGV`` with stdout and stderr on a real pseudo-terminal; all it wrote."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    proc = subprocess.Popen([sys.executable, "-m", "fusionkd", *argv], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


# ---------------------------------------------------------------------- progress on a terminal
@pytest.mark.slow
def test_bar_shows_mid_epoch_on_a_terminal_at_default_settings(tmp_path):
    rc, out = run_in_pty(["train", *TINY_ARGS, "--out-dir", str(tmp_path), "name=pty"], tmp_path)
    assert rc == 0, out
    # the bar (drawn with carriage returns) appears before the epoch's end: "epoch 1/2 [###---] 1/3 loss ..."
    bars = [seg for seg in out.split("\r") if seg.startswith("epoch 1/2 [")]
    assert bars, out
    assert any(" 1/3 " in seg and "loss " in seg and "ETA" in seg for seg in bars), bars
    assert "evaluating" in out  # the evaluation passes show too
    assert "test" in out and "best epoch" in out  # the result table at the end


@pytest.mark.slow
def test_compare_live_lines_on_a_terminal(tmp_path):
    rc, out = run_in_pty(["compare", "--methods", "baseline", "--seeds", "0,1", "--workers", "2", "--threads",
                          "1", "--out", str(tmp_path / "cmp"), *[a for a in TINY_ARGS if a != "threads=1"]], tmp_path,
                         timeout=400)
    assert rc == 0, out
    assert "[1] resnet20-baseline-s0" in out and "[2] resnet20-baseline-s1" in out  # one live line per worker
    assert "\x1b[1A\x1b[2K" in out  # redrawn in place
    assert "epoch " in out and "best-val" in out and "gain best-val" in out  # the compact table


def test_live_board_text_from_status_files(tmp_path):
    from fusionkd.compare.live import LiveBoard, status_text

    status = tmp_path / "a.status.json"
    status.write_text(json.dumps({"epoch": 3, "epochs": 10, "step": 7, "steps": 39, "phase": "train",
                                  "loss": 0.51234, "val": 81.25, "img_per_s": 1234.0, "eta_s": 75}))
    assert status_text(json.loads(status.read_text())) == \
        "epoch 3/10 | step 7/39 | loss 0.5123 | val 81.25% | 1,234 img/s | ETA 01:15"
    assert status_text({"epoch": 2, "epochs": 4, "phase": "eval val", "eval_done": 1000, "eval_total": 6000}) \
        .startswith("epoch 2/4 | evaluating val 1,000/6,000")
    said: list[str] = []
    board = LiveBoard(stream=open(os.devnull, "w"), say=said.append, log_interval=0.0)  # not a terminal
    board.update([("[1] run-a", status), ("[2] run-b", tmp_path / "missing.json")])
    assert said == ["  [1] run-a  epoch 3/10 | step 7/39 | loss 0.5123 | val 81.25% | 1,234 img/s | ETA 01:15",
                    "  [2] run-b  starting ..."]


# ---------------------------------------------------------------------- CLI
def test_key_value_after_a_flag_and_print_config_shows_method_defaults(capsys):
    assert main(["train", "--method", "frskd", "--epochs", "3", "threads=1", "name=x", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "threads: 1" in out and "name: x" in out
    assert "alpha: 2.0" in out and "beta: 100.0" in out  # the method's resolved options, not "options: {}"
    assert main(["train", "--method", "frskd", "options.alpha=3", "--print-config"]) == 0
    assert "alpha: 3.0" in capsys.readouterr().out
    assert main(["train", "--method", "baseline", "oops", "--print-config"]) == 2  # a stray word: still an error
    assert "'oops' is not of the form key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "baseline", "--nope", "--print-config"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_list_is_sorted(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections = out.split("models:")
    methods = [ln.split()[0] for ln in sections[0].splitlines()[1:] if ln.startswith("  ")]
    assert methods == sorted(methods) and "frskd" in methods


def test_cli_stop_after_is_said_once_and_finished_resume_says_so(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="fusionkd")
    args = ["train", *TINY_ARGS, "--out-dir", str(tmp_path), "name=r", "progress=none"]
    assert main([*args, "--stop-after", "1"]) == 0
    said = capsys.readouterr().out + caplog.text
    assert said.count("stopped after epoch 1") == 1
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    caplog.clear()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out + caplog.text
    assert "already finished" in text and "resumed" not in text


@pytest.mark.slow
def test_export_writes_onnx_only_when_asked(tmp_path, capsys):
    r = fusionkd.train(**TINY, out_dir=str(tmp_path), name="e", progress="none")
    assert main(["export", str(r.run_dir / "best.pt"), "--out", str(tmp_path / "plain.pt2")]) == 0
    assert (tmp_path / "plain.pt2").is_file() and not (tmp_path / "plain.onnx").exists()
    w = fusionkd.export_checkpoint(r.run_dir / "best.pt", tmp_path / "api.pt2")
    assert "onnx" not in w and not (tmp_path / "api.onnx").exists()
    # eval: the confusion matrix names its columns
    assert main(["eval", str(r.run_dir / "best.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "columns: predicted class" in out
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("true"))
    assert header.split()[1:] == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_api_logs_at_info_when_nothing_is_configured(tmp_path):
    code = ("import fusionkd; fusionkd.train(method='baseline', dataset='synthetic', image_size=16, "
            "val_fraction=0.25, batch_size=16, epochs=1, threads=1, out_dir=%r, name='api', progress='log', "
            "dataset_options={'num_classes': 4, 'in_chans': 1, 'train_size': 32, 'test_size': 16})"
            ).replace("%r", repr(str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "baseline on synthetic" in p.stderr and "epoch 1 |" in p.stderr
    quiet = subprocess.run([sys.executable, "-c", code.replace("'log'", "'none'").replace("'api'", "'q'")],
                           capture_output=True, text=True, env=env, timeout=240)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


# ---------------------------------------------------------------------- report keying
def test_report_never_puts_two_image_folders_in_one_row(tmp_path):
    from test_data_datasets import write_png_tree

    from fusionkd.compare.report import report_from_folders

    runs = tmp_path / "runs"
    for i, classes in enumerate((["cat", "dog"], ["cat", "dog"])):
        root = tmp_path / f"folder{i}"
        write_png_tree(root, {"train": 8 + 4 * i, "test": 2}, classes, size=(16, 16), seed=i)
        fusionkd.train(method="baseline", dataset="imagefolder", data_dir=str(root), image_size=16,
                       val_fraction=0.25, batch_size=4, eval_batch_size=16, epochs=1, threads=1,
                       out_dir=str(runs), name=f"r{i}", progress="none")
    files = report_from_folders([runs], tmp_path / "rep", plots=False)
    labels = sorted(g.dataset for g in files.groups)
    assert len(labels) == 2, labels  # one row per folder, never "baseline" averaged over both
    assert all(str(tmp_path / "folder") in lab for lab in labels)
    csv = (tmp_path / "rep" / "results.csv").read_text()
    assert "folder0" in csv and "folder1" in csv
    # the same folder read twice (another seed) stays one row
    fusionkd.train(method="baseline", dataset="imagefolder", data_dir=str(tmp_path / "folder0"), image_size=16,
                   val_fraction=0.25, batch_size=4, eval_batch_size=16, epochs=1, threads=1, seed=1,
                   out_dir=str(runs), name="r0-s1", progress="none")
    files = report_from_folders([runs], tmp_path / "rep2", plots=False)
    assert sorted(len(g.seeds) for g in files.groups) == [1, 2]


def test_demo_precision_auto_follows_a_measurement(monkeypatch):
    from fusionkd.compare import demo
    from fusionkd.engine.trainer import cpu_bf16_support

    assert cpu_bf16_support({"avx512f", "avx512_bf16", "amx_bf16"}) == "amx"
    assert cpu_bf16_support({"avx512_bf16"}) == "avx512_bf16" and cpu_bf16_support({"avx2"}) == "none"
    speed = demo.measure_cpu_precision(threads=1, steps=1, batch=8)  # real steps, both precisions
    assert set(speed) == {"fp32", "bf16"} and all(v > 0 for v in speed.values())
    assert demo.resolve_precision("fp32") == ("fp32", "as asked")
    monkeypatch.setattr(demo, "measure_cpu_precision", lambda threads: {"fp32": 100.0, "bf16": 105.0})
    prec, why = demo.resolve_precision("auto")
    assert prec == "fp32" and "fp32 100 img/s, bf16 105 img/s" in why  # not clearly faster: fp32
    monkeypatch.setattr(demo, "measure_cpu_precision", lambda threads: {"fp32": 100.0, "bf16": 160.0})
    assert demo.resolve_precision("auto")[0] == "bf16"


def test_export_onnx_without_the_package_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from fusionkd.engine.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the onnx package"):
        fusionkd.export_checkpoint(tmp_path / "never-read.pt", tmp_path / "m.pt2", onnx=True)
    assert not list(tmp_path.iterdir())  # refused before the checkpoint was even opened
