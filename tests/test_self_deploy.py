"""What every self-distillation method (byot, frskd, fmfsd) deploys, and one end-to-end run of each through
``fusionkd.train`` on the synthetic dataset."""

from __future__ import annotations

import json

import pytest
import torch

import fusionkd
from fusionkd.methods import METHODS, MethodContext, count_parameters
from fusionkd.models import create_model

SELF_METHODS = ["byot", "frskd", "fmfsd"]
HEADS = {"byot": {"branch1", "branch2", "net"}, "frskd": {"net", "teacher"},
         "fmfsd": {"branch1", "branch2", "net", "fused"}}


def trained(name: str, model: str = "resnet20", steps: int = 2):
    """A method after a few SGD steps (so that its weights and BN statistics are not the initial ones)."""
    torch.manual_seed(0)
    ctx = MethodContext(model=model, num_classes=10, in_chans=1, image_size=28, epochs=2)
    method = METHODS.get(name)(ctx)
    opt = torch.optim.SGD([p for g in method.param_groups(5e-4) for p in g["params"]], lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    method.train()
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = sum(method.training_step(x, y, 0).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return method.eval()


@pytest.mark.parametrize("name", SELF_METHODS)
@pytest.mark.parametrize("model", ["resnet20", "wrn_16_2"])
def test_deploy_model_is_the_bare_backbone(name, model):
    method = trained(name, model)
    assert METHODS.entry(name).extras["family"] == "self"
    deploy = method.deploy_model()
    fresh = create_model(method.deploy_model_name, num_classes=10, in_chans=1)
    assert type(deploy) is type(fresh) and method.deploy_model_name == model
    assert count_parameters(deploy) == count_parameters(fresh)
    assert method.extra_parameters() == count_parameters(method) - count_parameters(fresh) > 0
    fresh.load_state_dict(deploy.state_dict())  # what the engine does with a checkpoint
    fresh.eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        heads = method.eval_logits(x)
        assert set(heads) == HEADS[name] and method.deploy_head == "net"
        assert torch.allclose(fresh(x), heads[method.deploy_head], atol=1e-5)


def test_deploy_model_exports():
    method = trained("frskd")
    net = create_model("resnet20", num_classes=10, in_chans=1)
    net.load_state_dict(method.deploy_model().state_dict())
    net.eval()
    x = torch.randn(2, 1, 28, 28)
    program = torch.export.export(net, (x,))
    probe = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(program.module()(probe), method.eval_logits(probe)["net"], atol=1e-5)


@pytest.mark.parametrize("name", SELF_METHODS)
def test_end_to_end_on_synthetic_data(name, tmp_path):
    kw = {"precision": "bf16", "channels_last": True} if name == "frskd" else {}
    r = fusionkd.train(
        method=name, model="resnet20", dataset="synthetic",
        dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 160, "test_size": 40},
        image_size=28, val_fraction=0.2, batch_size=32, eval_batch_size=64, epochs=2, lr=0.05,
        progress="none", threads=1, out_dir=str(tmp_path), name=name, **kw,
    )
    s = r.summary
    heads = HEADS[name]
    assert s["family"] == "self" and s["deploy_head"] == "net" and set(s["heads"]) == heads
    assert s["params"]["deploy"] == count_parameters(create_model("resnet20", num_classes=4, in_chans=1))
    assert s["params"]["extra"] > 0
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert set(m["val"]) == heads and set(m.get("test", heads)) == heads
        assert all(v == v for v in m["train"].values())  # no NaN loss term
    assert "test" in lines[-1] and set(s["best"]["test"]) == heads
    expected_terms = {"byot": {"loss_ce_net", "loss_ce_branches", "loss_kd", "loss_feat"},
                      "frskd": {"loss_ce", "loss_ce_teacher", "loss_kd", "loss_at"},
                      "fmfsd": {"loss_ce_branches", "loss_ce_net", "loss_ce_fused", "loss_kd_net", "loss_kd_fused",
                                "loss_feat"}}[name]
    assert set(lines[0]["train"]) == expected_terms | {"loss"}
    net = r.load_deploy_model("last")
    assert count_parameters(net) == s["params"]["deploy"]
    with torch.inference_mode():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    if name == "frskd":  # the published recipe (weight decay 1e-4) is applied under the user's options
        assert r.config.weight_decay == 1e-4
