"""Plug-ins: a real package with ``fusionkd.*`` entry points, installed with pip into a folder and used by
fresh processes (list, train, eval); a local ``--plugin`` file for one run, which resume loads again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = Path(__file__).with_name("plugin_pkg")


def _run(args, env_path: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fusionkd", *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(PKG)], text=True, capture_output=True,
                       timeout=300, cwd=build)
    if r.returncode != 0:
        pytest.skip(f"cannot build the plug-in package here (needs setuptools): {r.stderr[-500:]}")
    assert list(target.glob("fusionkd_tinyplug-0.1.0.dist-info/entry_points.txt"))
    return target


@pytest.mark.slow
def test_installed_plugin_package_is_listed_and_trains(installed, tmp_path):
    path = f"{installed}{os.pathsep}{ROOT / 'src'}"
    r = _run(["list", "--json"], path, tmp_path)
    assert r.returncode == 0, r.stderr
    reg = json.loads(r.stdout)
    src = {(s, e["name"]): e["source"] for s in ("methods", "models", "datasets") for e in reg[s]}
    assert src[("methods", "tiny_ls")] == "entry point fusionkd-tinyplug 0.1.0 (tinyplug.methods)"
    assert src[("models", "tiny_resnet8")] == "entry point fusionkd-tinyplug 0.1.0 (tinyplug.models:tiny_resnet8)"
    assert src[("datasets", "stripes")].startswith("entry point fusionkd-tinyplug")
    assert src[("methods", "baseline")] == "fusionkd" and reg["plugin_errors"] == []

    r = _run(["train", "--method", "tiny_ls", "--model", "tiny_resnet8", "--dataset", "stripes", "--epochs", "3",
              "--batch-size", "16", "--lr", "0.05", "--progress", "log", "options.smoothing=0.2", "threads=1",
              f"out_dir={tmp_path / 'runs'}", "name=p"], path, tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "runs" / "p" / "summary.json").read_text())
    assert summary["method"] == "tiny_ls" and summary["model"] == "tiny_resnet8"
    assert summary["last"]["test"]["net"] > 70  # stripes are easy: it really learned
    ev = _run(["eval", str(tmp_path / "runs" / "p" / "best.pt"), "--json"], path, tmp_path)
    assert ev.returncode == 0 and json.loads(ev.stdout)["dataset"] == "stripes"


def test_a_broken_entry_point_is_reported_not_fatal(tmp_path):
    site = tmp_path / "site"
    (site / "broken_plug-0.1.dist-info").mkdir(parents=True)
    (site / "broken_plug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plug\n"
                                                                 "Version: 0.1\n")
    (site / "broken_plug-0.1.dist-info" / "entry_points.txt").write_text("[fusionkd.methods]\nbad = no_such_mod\n")
    r = _run(["list"], f"{site}{os.pathsep}{ROOT / 'src'}", tmp_path)
    assert r.returncode == 0 and "baseline" in r.stdout
    assert "plug-in bad (fusionkd.methods) failed to load: ModuleNotFoundError" in r.stdout


MY_METHOD = '''
import torch.nn.functional as F

from fusionkd.methods import Method, register_method
from fusionkd.methods.base import NetDeployment


@register_method("file_ce", "cross-entropy, from a local plug-in file")
class FileCE(NetDeployment, Method):
    family = "baseline"

    def __init__(self, ctx, options=None):
        super().__init__(ctx, options)
        self.net = ctx.create()

    def training_step(self, images, labels, epoch):
        return {"loss_ce": F.cross_entropy(self.net(images), labels)}

    def eval_logits(self, images):
        return {"net": self.net(images)}
'''


@pytest.mark.slow
def test_plugin_file_for_one_run_and_its_resume(tmp_path, capsys):
    (tmp_path / "my_method.py").write_text(MY_METHOD)
    src = str(ROOT / "src")
    common = ["--dataset", "synthetic", "--model", "wrn_16_1", "--epochs", "2", "--batch-size", "32", "threads=1",
              "dataset_options={train_size: 64, test_size: 16, num_classes: 4}", "image_size=16",
              f"out_dir={tmp_path / 'runs'}", "name=f", "progress=none"]
    r = _run(["train", "--plugin", "my_method.py", "--method", "file_ce", "--stop-after", "1", *common], src, tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = (tmp_path / "runs" / "f" / "config.yaml").read_text()
    assert str(tmp_path / "my_method.py") in cfg  # the absolute path is kept for resume and workers
    r = _run(["train", "--resume", str(tmp_path / "runs" / "f")], src, tmp_path)  # no --plugin needed
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "runs" / "f" / "summary.json").read_text())["method"] == "file_ce"
    listed = _run(["list", "--plugin", str(tmp_path / "my_method.py")], src, tmp_path).stdout
    assert "file_ce" in listed and f"(from file {tmp_path / 'my_method.py'})" in listed
    from fusionkd.cli import main

    assert main(["train", "--plugin", str(tmp_path / "nope.py"), "--method", "file_ce", *common]) == 2
    assert "nope.py': no such Python file" in capsys.readouterr().err
