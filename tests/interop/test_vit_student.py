"""A timm ViT as the **student** of every offline method (its patch-token maps feed the feature methods, its
own head gives its logits), resumed exactly, and refused as a peer of an online or self method."""

from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

import fusionkd  # noqa: E402
from fusionkd.engine.checkpoint import load_checkpoint  # noqa: E402
from fusionkd.engine.config import ConfigError  # noqa: E402

from .common import VIT, tiny  # noqa: E402

pytestmark = pytest.mark.interop

TINY = tiny(image_size=16, train_size=64, test_size=32, epochs=None)
SMALL_VIT = {"img_size": 16, "patch_size": 4, "depth": 2}  # 4x4 patch grid, 2 blocks: a fast student


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t")
    return fusionkd.train(method="baseline", model="resnet8", epochs=3, out_dir=str(out), name="t", **TINY)


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "fitnet", "at", "reviewkd", "crd", "mfkd"])
def test_a_vit_student_of_every_offline_method(tmp_path, teacher, method):
    r = fusionkd.train(method=method, model=VIT, model_kwargs=SMALL_VIT, epochs=2, out_dir=str(tmp_path),
                       name=method, teacher=str(teacher.run_dir / "best.pt"), teacher_min_accuracy=0, **TINY)
    s = json.loads((r.run_dir / "summary.json").read_text())
    assert s["finished"] and s["model"] == VIT
    ckpt = load_checkpoint(r.run_dir / "last.pt")
    assert ckpt["deploy"]["model"] == VIT and ckpt["deploy"]["model_kwargs"] == SMALL_VIT
    deployed = r.load_deploy_model().eval()  # rebuilt by name and keywords
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert deployed(x).shape == (2, 4) and torch.isfinite(deployed(x)).all()


def test_a_vit_student_resumes_exactly(tmp_path, teacher):
    from fusionkd.engine.config import resolve_config
    from fusionkd.engine.trainer import Trainer

    common = dict(TINY, method="fitnet", model=VIT, model_kwargs=SMALL_VIT, epochs=2,
                  teacher=str(teacher.run_dir / "best.pt"), teacher_min_accuracy=0, out_dir=str(tmp_path))
    straight = fusionkd.train(name="straight", **common)
    trainer = Trainer(resolve_config(dict(common, name="cut")))
    trainer.stop_after = 1
    trainer.fit()
    resumed = fusionkd.resume(tmp_path / "cut")
    a = load_checkpoint(straight.run_dir / "last.pt")["method_state"]
    b = load_checkpoint(resumed.run_dir / "last.pt")["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["dml", "ffl", "frskd", "byot"])
def test_a_vit_is_refused_as_an_online_peer_or_self_network(tmp_path, method):
    with pytest.raises(ConfigError, match="vision transformer: its head reads the class token"):
        fusionkd.train(method=method, model=VIT, model_kwargs=SMALL_VIT, epochs=1, out_dir=str(tmp_path),
                       name=method, **TINY)
    assert not (tmp_path / method).exists()
