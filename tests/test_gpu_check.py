"""benchmarks/gpu_check.py, the one-command GPU check, kept from rotting between GPU loans: its dry run
(the same code on the CPU at tiny sizes, every stage) must pass here, with the files and numbers a GPU run
returns; and every CUDA-marked test must live in a file that the check collects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_formats import write_fashion_mnist

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_every_stage_on_cpu(tmp_path):
    data = tmp_path / "fm"
    write_fashion_mnist(data, n_train=400, n_test=60)  # the real IDX .gz layout
    out = tmp_path / "out"
    proc = _run(str(out), "--dry-run", "--device", "cpu", "--stages", "tests,bench,profile,table",
                "--data-dir", str(data), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # flat, at most 8 files, plain names: what comes back from the GPU machine
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "numbers.json", "profile.txt", "summary.md", "table.md", "tests.txt"]
    assert all(p.is_file() for p in out.iterdir())
    n = json.loads((out / "numbers.json").read_text())

    # tests: the CUDA-marked tests ran in their CPU rehearsal, and passed
    assert n["tests"]["exit_code"] == 0 and n["tests"]["passed"] >= 5, n["tests"]
    assert "passed" in (out / "tests.txt").read_text()

    # bench: 2 methods x 2 eager settings, each measured with finite losses, baseline ratio and FLOPs
    rows = n["bench"]["results"]
    assert {(r["method"], r["setting"]) for r in rows} == {(m, s) for m in ("baseline", "ffl_s")
                                                            for s in ("fp32", "bf16+cl")}
    for r in rows:
        assert "error" not in r, r
        assert r["img_per_s"] > 0 and r["loss_finite"] and r["gflop_per_img"] > 0
    ffl_s = {r["setting"]: r for r in rows if r["method"] == "ffl_s"}
    base = {r["setting"]: r for r in rows if r["method"] == "baseline"}
    for s in ffl_s:  # FFL-S trains two networks and a fusion module: more FLOPs per image than one network
        assert ffl_s[s]["gflop_per_img"] > 1.2 * base[s]["gflop_per_img"]
        assert ffl_s[s]["time_ratio"] == pytest.approx(base[s]["img_per_s"] / ffl_s[s]["img_per_s"], rel=1e-2)
    assert {e["setting"] for e in n["eval"]} == {"fp32", "bf16+cl"}
    cases = n["projection"]["cases"]
    assert cases and cases[0]["projected_300_epochs_s"] == pytest.approx(
        300 * (cases[0]["epoch_train_s"] + cases[0]["epoch_eval_s"]), rel=1e-2)

    # profile: the slowest fusion method measured (only ffl_s here), a table of operators
    assert n["profile"]["method"] == "ffl_s" and n["profile"]["wall_ms_per_step"] > 0
    assert "Self CPU" in (out / "profile.txt").read_text()

    # table: both methods trained through compare on the Fashion-MNIST files, protocol beside the numbers
    runs = {r["method"]: r for r in n["table"]["runs"]}
    assert set(runs) == {"baseline", "ffl"} and n["table"]["exit_code"] == 0
    for r in runs.values():
        assert r["best_epoch"] == 1 and 0 <= r["test_at_best"] <= 100
    summary = (out / "summary.md").read_text()
    for heading in ("## Machine", "## CUDA tests", "## Training throughput", "## Projection", "## Profile",
                    "## Fashion-MNIST, full data"):
        assert heading in summary
    assert "validation split" in (out / "table.md").read_text()


def test_refuses_an_output_folder_holding_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("work")
    proc = _run(str(out), "--dry-run", "--device", "cpu", "--stages", "profile", timeout=120)
    assert proc.returncode != 0 and "not empty" in proc.stderr + proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "work"


def test_without_cuda_says_so_and_points_to_the_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _run(str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_cuda_test_is_in_a_file_the_check_collects():
    import ast

    tree = ast.parse(SCRIPT.read_text())
    listed = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", "") == "CUDA_TEST_FILES" for t in node.targets))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-m", "cuda", "-p",
                           "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert ids, proc.stdout[-2000:]
    files = {ln.split("::")[0] for ln in ids}
    assert files <= set(listed), files - set(listed)


def test_table_without_fashion_mnist_is_skipped_and_said(tmp_path):
    out = tmp_path / "out"
    proc = _run(str(out), "--dry-run", "--device", "cpu", "--stages", "table", "--data-dir", str(tmp_path / "none"),
                "--work", str(tmp_path / "work"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = json.loads((out / "numbers.json").read_text())
    assert "skipped" in n["table"] and "stage skipped" in (out / "log.txt").read_text()
    assert not (tmp_path / "work" / "table").exists()  # nothing trained
