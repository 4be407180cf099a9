"""End-to-end smoke runs of the online methods through ``fusionkd.train`` on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fusionkd
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.models import create_model

TINY = dict(
    model="resnet20", dataset="synthetic",
    dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 96, "test_size": 40},
    image_size=16, val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=2, lr=0.05,
    progress="none", threads=1,
)
CASES = {
    "dml": ({}, {"peer1", "peer2", "ensemble"}, {"loss_ce", "loss_kl"}),
    "one": ({"branches": 2}, {"branch1", "branch2", "gate"}, {"loss_ce", "loss_ce_gate", "loss_kd"}),
    "ffl": ({}, {"sub1", "sub2", "ensemble", "fused"},
            {"loss_ce", "loss_ce_fused", "loss_kd_sub", "loss_kd_fused"}),
    "ffl_s": ({"batched_peers": True}, {"sub1", "sub2", "ensemble", "fused"},
              {"loss_ce", "loss_ce_fused", "loss_kd_sub", "loss_kd_fused"}),
    "mfef": ({"peer_kl": 1.0}, {"student1", "student2", "ensemble", "fused"},
             {"loss_ce", "loss_ce_fused", "loss_kd_sub", "loss_kd_fused", "loss_kl_peer"}),
}


@pytest.mark.parametrize("method", list(CASES))
def test_online_method_trains_end_to_end(tmp_path: Path, method: str):
    options, heads, terms = CASES[method]
    extra = {"models": ["resnet20", "wrn_16_1"]} if method == "ffl" else {}
    torch.manual_seed(0)
    r = fusionkd.train(method=method, options=options, out_dir=str(tmp_path), name=method, **extra, **TINY)
    s = r.summary
    assert s["finished"] and s["family"] == "online"
    assert set(s["heads"]) == heads and set(s["best"]["val"]) == heads
    assert r.deploy_head in heads and r.deploy_head not in {"ensemble", "fused", "gate"}
    lines = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert terms <= set(line["train"]) and all(map(lambda v: v == v, line["train"].values()))
    net = r.load_deploy_model("last")
    assert type(net) is type(create_model(s["deploy_model"]))
    ckpt = load_checkpoint(r.run_dir / "last.pt")
    assert "best_peer" in ckpt["method_state"]
    if method == "ffl":  # heterogeneous sub-networks, the published recipe and the fusion module's decay
        assert s["models"] == ["resnet20", "wrn_16_1"]
        cfg = r.config
        assert cfg.nesterov is True and cfg.weight_decay == 1e-4
        decays = {g["name"]: g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]}
        assert decays == {"networks": 1e-4, "fusion": 1e-5}


def test_online_options_through_the_config():
    cfg = resolve_config({"method": "ffl_s"}, overrides=["options.branches=3", "weight_decay=0.0005"])
    assert cfg.options == {"branches": 3} and cfg.nesterov is True and cfg.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="branches must be at least 2"):
        resolve_config({"method": "one", "options": {"branches": 1}})
    with pytest.raises(ConfigError, match="mode must be one of"):
        resolve_config({"method": "mfef", "options": {"mode": "pyramids"}})
    with pytest.raises(ConfigError, match="accepted by: .*dml.*ffl.*mfef"):
        resolve_config({"method": "ffl_s", "models": ["resnet20", "resnet20"]})
