"""Data-parallel training: 2 CPU processes with gloo on loopback, launched by the real ``torchrun``.

Checks that parameters stay identical across ranks, and that they match a single process that runs the
same two rank shards of every batch and averages their gradients (what DDP computes: each rank's
BatchNorm normalises with its own half-batch statistics, so the reference must do the same; PyTorch's
SyncBatchNorm, which would make it one combined batch, has no CPU kernel).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusionkd.data import DeviceLoader, load_dataset
from fusionkd.engine.config import resolve_config
from fusionkd.engine.optim import build_optimizer, build_scheduler
from fusionkd.engine.trainer import build_method, seed_everything
from fusionkd.methods import METHODS

#: every test here launches torchrun (2 processes) at least once: ~10-25 s each
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SETTINGS = dict(
    model="resnet20", dataset="synthetic", image_size=16, val_fraction=0.25, batch_size=8, eval_batch_size=32,
    dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 16},
    epochs=2, lr=0.05, schedule="constant", progress="none", threads=1, seed=3,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command() -> list[str]:
    """The real torchrun: its script next to this Python (or on PATH), else the module it runs."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]


def _torchrun(settings: dict, out: Path, mode: str = "", nproc: int = 2) -> None:
    cmd = [*torchrun_command(), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), str(HERE / "ddp_worker.py"), json.dumps(settings), str(out)] + ([mode] if mode else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _single_process_reference(settings: dict) -> dict[str, torch.Tensor]:
    """Same init, same rank shards, gradients averaged over the two shards, same optimizer steps."""
    cfg = resolve_config(settings)
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    splits = load_dataset(cfg.dataset, val_fraction=cfg.val_fraction, seed=cfg.data_seed,
                          image_size=cfg.image_size, **cfg.dataset_options)
    method = build_method(cfg, splits.info, torch.device("cpu"))
    loaders = [DeviceLoader(splits.train, splits.info, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                            rank=r, world_size=2) for r in range(2)]
    optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg, cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, len(loaders[0]))
    for epoch in range(cfg.epochs):
        method.on_epoch_start(epoch)
        method.train()
        for loader in loaders:
            loader.set_epoch(epoch)
        for batches in zip(*loaders):
            optimizer.zero_grad(set_to_none=True)
            for images, labels in batches:
                loss = sum(v.float() for v in method(images, labels, epoch).values())
                (loss / 2).backward()
            optimizer.step()
            scheduler.step()
    return {k: v.detach() for k, v in method.named_parameters()}


@pytest.mark.parametrize("method", ["baseline", "ffl", "frskd"])
def test_ddp_two_cpu_processes_match_single_process(method, tmp_path):
    if method not in METHODS:
        pytest.fail(f"method {method!r} is not registered")
    settings = {**SETTINGS, "method": method, "out_dir": str(tmp_path / "runs"), "name": method}
    _torchrun(settings, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"{k} differs across ranks"
    assert r0["summary"] == r1["summary"]  # every rank reports the same (all-reduced) metrics
    assert r0["summary"]["data"]["train"] == 48
    for r in (r0, r1):  # fit() released its DDP wrapper and destroyed the group before returning
        assert r["teardown"] == {"ddp_wrappers": 0, "group_alive": False}
    ref = _single_process_reference(settings)
    for k, v in ref.items():
        assert torch.allclose(r0["params"][k], v, atol=2e-5, rtol=1e-4), f"{k}: DDP != single process"
    run = tmp_path / "runs" / method
    assert (run / "summary.json").is_file() and (run / "last.pt").is_file()  # rank 0 wrote the run folder


def test_ddp_resume_continues_exactly(tmp_path):
    """A DDP run stopped after one epoch and resumed under torchrun ends where an uninterrupted one does."""
    full = {**SETTINGS, "method": "baseline", "out_dir": str(tmp_path / "runs"), "name": "full"}
    part = {**full, "name": "part"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _torchrun(full, tmp_path / "a")
    _torchrun(part, tmp_path / "b", "1")
    assert torch.load(tmp_path / "runs" / "part" / "last.pt", weights_only=True)["epoch"] == 1
    _torchrun(part, tmp_path / "b", f"resume:{tmp_path / 'runs' / 'part'}")
    a = torch.load(tmp_path / "a" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "rank0.pt", weights_only=True)
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["summary"]["best"] == b["summary"]["best"]


def test_ddp_with_frozen_teacher_and_stage_switch(tmp_path):
    """mfkd: the frozen teacher is replicated (never wrapped, never changed) and the fusion module, frozen
    after its own stage, makes the engine re-wrap DDP instead of needing find_unused_parameters."""
    import fusionkd

    teacher = fusionkd.train(**{**SETTINGS, "method": "baseline", "epochs": 1, "out_dir": str(tmp_path / "t"),
                                "name": "teacher"})
    settings = {**SETTINGS, "method": "mfkd", "epochs": 3, "teacher": str(teacher.run_dir / "best.pt"),
                "teacher_min_accuracy": 0,  # a 1-epoch teacher: the test is about replication, not teaching
                "options": {"fusion_epochs": 1}, "out_dir": str(tmp_path / "runs"), "name": "mfkd"}
    _torchrun(settings, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"{k} differs across ranks"
    original = torch.load(teacher.run_dir / "best.pt", weights_only=True)["deploy"]["state_dict"]
    for name, value in original.items():
        for r in (r0, r1):
            trained = {**r["params"], **r["buffers"]}
            key = next(k for k in trained if k.endswith("teacher." + name) or k.endswith("teacher.model." + name))
            assert torch.equal(trained[key], value), f"teacher {name} changed"


def test_env_info_forms_a_group_for_any_process_torchrun_launched(monkeypatch):
    """Launched by torchrun (its RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, or TORCHELASTIC_RUN_ID): a
    process group even with world size 1. WORLD_SIZE=1 alone is one plain process."""
    from fusionkd.engine import distributed as D
    from fusionkd.engine.config import ConfigError

    for k in (*D.LAUNCHER_VARIABLES, "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    assert D.env_info() == D.DistInfo() and not D.DistInfo().enabled
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not D.env_info().enabled
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    info = D.env_info()
    assert info == D.DistInfo(0, 1, 0, launched=True) and info.enabled and info.is_main
    monkeypatch.delenv("MASTER_PORT")
    assert not D.env_info().enabled
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert D.env_info().enabled
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set but RANK is not"):
        D.env_info()


def test_one_process_torchrun_forms_a_gloo_group_and_equals_a_plain_run(tmp_path):
    """``torchrun --nproc-per-node 1`` trains in a gloo group of one (DDP and every collective run, as each of N
    processes would; the CUDA twin, NCCL with sync_bn, is tests/test_cuda.py), records it in summary.json
    (``hardware.distributed``), tears it down, and ends bit-identical to one plain process: a world of one
    averages every gradient over itself."""
    from fusionkd.engine.trainer import Trainer

    settings = {**SETTINGS, "method": "baseline", "out_dir": str(tmp_path / "runs"), "name": "torchrun"}
    _torchrun(settings, tmp_path, nproc=1)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert not (tmp_path / "rank1.pt").exists()
    assert r0["summary"]["hardware"]["distributed"] == {"world_size": 1, "backend": "gloo"}
    assert r0["teardown"] == {"ddp_wrappers": 0, "group_alive": False}
    written = json.loads((tmp_path / "runs" / "torchrun" / "summary.json").read_text())
    assert written["hardware"]["distributed"] == {"world_size": 1, "backend": "gloo"}

    plain = Trainer(resolve_config({**settings, "name": "plain"}))
    result = plain.fit()
    assert result.summary["hardware"]["distributed"] is None
    assert result.summary["best"] == r0["summary"]["best"] and result.summary["last"] == r0["summary"]["last"]
    params = dict(plain.method.named_parameters())
    assert params.keys() == r0["params"].keys()
    for k, v in params.items():
        assert torch.equal(v.detach(), r0["params"][k]), f"{k}: 1-process torchrun != plain process"
    for k, v in plain.method.named_buffers():
        assert torch.equal(v, r0["buffers"][k]), f"buffer {k}: 1-process torchrun != plain process"
