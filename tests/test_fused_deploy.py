"""options.deploy=fused (ffl, mfef): the deployed network is every sub-network + the fusion module, and it
gives exactly the method's ``fused`` head through best.pt, the deploy file, torch.export and ONNX."""

from __future__ import annotations

import pytest
import torch

import fusionkd
from fusionkd.engine.checkpoint import build_deploy_model, load_checkpoint
from fusionkd.engine.config import ConfigError

TINY = dict(dataset="synthetic", image_size=16, val_fraction=0.25, batch_size=16, epochs=2, threads=1,
            progress="none", dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 48, "test_size": 32})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ffl", "mfef"])
def test_fused_deployment_is_the_fused_head_everywhere(method, tmp_path):
    r = fusionkd.train(method=method, options={"deploy": "fused"}, out_dir=str(tmp_path), name=method, **TINY)
    s = r.summary
    assert s["deploy_head"] == "fused" and s["deploy_model"] == "fused_peers"
    costs = s["method_extras"]["deploy_costs"]
    assert costs["fused"]["params"] == s["params"]["deploy"] and s["params"]["extra"] == 0
    assert costs["fused"]["params"] > 2 * costs["single_peer"]["params"]  # m peers + the fusion module
    assert costs["fused"]["macs"] > 2 * costs["single_peer"]["macs"] > 0
    # best.pt's deployed network computes the method's fused head, bit for bit
    ckpt = load_checkpoint(r.run_dir / "best.pt")
    net = build_deploy_model(ckpt)
    method_obj = fusionkd.engine.trainer.build_method(
        fusionkd.engine.config.build_dataclass(fusionkd.engine.config.Config, ckpt["config"]),
        fusionkd.data.DatasetInfo.from_dict(ckpt["data"]), torch.device("cpu"))
    method_obj.load_state_dict(ckpt["method_state"])
    method_obj.eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.inference_mode():
        want = method_obj.eval_logits(x)["fused"]
        assert torch.equal(net(x), want)
    # the exported program and the deploy file give the same logits, and eval of the deploy file reports
    # the fused head's test accuracy at the best epoch
    w = fusionkd.export_checkpoint(r.run_dir / "best.pt", tmp_path / f"{method}.pt2", onnx=True)
    program = torch.export.load(w["program"]).module()
    with torch.inference_mode():
        assert torch.allclose(program(x), want, atol=1e-5)
    ev = fusionkd.evaluate_checkpoint(w["deploy"], device="cpu")
    assert ev["accuracy"][ev["deploy_head"]] == pytest.approx(s["best"]["test"]["fused"])
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load(w["onnx"]))


def test_fused_deployment_refusals(tmp_path):
    with pytest.raises(ConfigError, match="deploy must be one of best_peer, fused"):
        fusionkd.train(method="ffl", options={"deploy": "all"}, out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match="deploy=fused needs independent sub-networks"):
        fusionkd.train(method="mfef", options={"deploy": "fused", "shared_trunk": True}, out_dir=str(tmp_path),
                       **TINY)
    with pytest.raises(ConfigError, match="not a network to train"):
        fusionkd.train(method="baseline", model="fused_peers", out_dir=str(tmp_path), **TINY)
