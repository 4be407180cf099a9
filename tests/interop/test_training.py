"""Training runs with torchvision and timm networks by name (the real packages; skipped without them): a
torchvision student through the CLI, a timm CNN teacher from a weights file for kd and fitnet, a timm ViT
teacher for kd and at, rebuilding a run's network from its checkpoint, and the refusals."""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import fusionkd  # noqa: E402
from fusionkd.cli import main  # noqa: E402
from fusionkd.engine.checkpoint import load_checkpoint  # noqa: E402
from fusionkd.engine.config import ConfigError  # noqa: E402
from fusionkd.models import HookBackbone  # noqa: E402

from .common import VIT, data, tiny  # noqa: E402

pytestmark = pytest.mark.interop

TINY = tiny()


def saved(tmp_path, name: str, net: torch.nn.Module) -> str:
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_a_torchvision_student_through_the_cli_and_rebuilt_from_its_checkpoint(tmp_path):
    rc = main(["train", "--method", "baseline", "--model", "torchvision:resnet18", "--dataset", "synthetic",
               "dataset_options={num_classes: 4, in_chans: 1, train_size: 48, test_size: 16}", "image_size=32",
               "epochs=1", "batch_size=16", "threads=1", "progress=none", f"out_dir={tmp_path}", "name=tv"])
    assert rc == 0
    ckpt = load_checkpoint(tmp_path / "tv" / "last.pt")
    assert ckpt["deploy"]["model"] == "torchvision:resnet18"
    r = fusionkd.api.evaluate_checkpoint(tmp_path / "tv" / "best.pt")  # rebuilt by name
    assert r is not None
    assert fusionkd.resume(tmp_path / "tv", epochs=2).summary["epochs"] == 2


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_a_timm_teacher_from_a_weights_file(tmp_path, method):
    torch.manual_seed(0)
    path = saved(tmp_path, "timm_resnet18", timm.create_model("resnet18", num_classes=4, in_chans=1))
    r = fusionkd.train(method=method, model="resnet20", teacher_model="timm:resnet18", teacher_weights=path,
                       teacher_min_accuracy=0.0, out_dir=str(tmp_path), name=method, **TINY)
    assert r.summary["finished"]
    assert load_checkpoint(r.run_dir / "last.pt")["teacher"]["model"] == "timm:resnet18"
    assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2  # the teacher rebuilt by name


def test_a_timm_teacher_trained_by_a_baseline_run(tmp_path):
    t = fusionkd.train(method="baseline", model="timm:resnet18", out_dir=str(tmp_path), name="teacher",
                       **{**TINY, "epochs": 2})
    assert isinstance(t.load_deploy_model(), HookBackbone)
    r = fusionkd.train(method="at", model="resnet20", teacher=str(t.run_dir / "best.pt"), teacher_min_accuracy=0.0,
                       out_dir=str(tmp_path), name="at", **TINY)
    assert r.summary["finished"]


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_a_vit_teacher_for_a_cnn_student(tmp_path, method):
    torch.manual_seed(0)
    vit = timm.create_model(VIT[5:], num_classes=4, in_chans=1)
    with torch.no_grad():  # an untrained teacher, made to predict class 0 (above 0%: the teacher check passes)
        vit.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    path = saved(tmp_path, "vit", vit)
    few = data(train_size=32, test_size=8)
    r = fusionkd.train(method=method, model="resnet20", teacher_model=VIT, teacher_weights=path,
                       teacher_min_accuracy=0.0, out_dir=str(tmp_path), name=method,
                       **{**TINY, "dataset_options": few, "image_size": 224, "batch_size": 8})
    assert r.summary["finished"]


def test_vit_refusals(tmp_path):
    path = saved(tmp_path, "vit", timm.create_model(VIT[5:], num_classes=4, in_chans=1))
    with pytest.raises(ConfigError, match=r"takes 224x224 images .* teacher_model_kwargs=\{img_size: 32\}.* "
                                          "or image_size=224"):
        fusionkd.train(method="kd", model="resnet20", teacher_model=VIT, teacher_weights=path,
                       out_dir=str(tmp_path), **TINY)
    for method, extra in (("dml", {"models": [VIT, "resnet20"]}), ("byot", {})):
        with pytest.raises(ConfigError, match=f"vision transformer.*the {'online' if extra else 'self'} methods"):
            fusionkd.train(method=method, model=VIT, out_dir=str(tmp_path), **{**TINY, "image_size": 224}, **extra)
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        fusionkd.train(method="baseline", model="timm:resnet19", out_dir=str(tmp_path), **TINY)
