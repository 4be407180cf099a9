"""torchvision's own ``VisionTransformer`` by name (``torchvision:vit_b_16``): the patch tokens of 4 encoder
layers as stage maps, its own logits from the class token, torchvision's state-dict keys, and training as a
teacher of kd and fitnet; refused under an online method."""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import fusionkd  # noqa: E402
from fusionkd.engine.checkpoint import load_checkpoint  # noqa: E402
from fusionkd.engine.config import ConfigError  # noqa: E402
from fusionkd.models import MODELS, create_model  # noqa: E402

from .common import tiny  # noqa: E402

pytestmark = pytest.mark.interop

VIT = "torchvision:vit_b_16"
TINY = tiny(train_size=32, batch_size=8, eval_batch_size=32, lr=0.01, epochs=None)


def test_maps_logits_and_keys_are_torchvisions():
    torch.manual_seed(0)
    net = create_model(VIT, num_classes=4, in_chans=3, image_size=32).eval()
    assert MODELS.entry(VIT).extras["tokens"] is True
    assert [(s.channels, s.stride) for s in net.stage_info] == [(768, 16)] * 4
    reference = torchvision.models.vit_b_16(num_classes=4, image_size=32).eval()
    missing = reference.load_state_dict({k[len("module."):]: v for k, v in net.state_dict().items()})
    assert not missing.missing_keys and not missing.unexpected_keys  # exactly torchvision's keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = net.forward_stages(x)
        assert [tuple(m.shape) for m in maps] == [(2, 768, 2, 2)] * 4
        assert torch.equal(net.forward_head(maps[-1]), reference(x)) and torch.equal(net(x), reference(x))
        with pytest.raises(ValueError, match="classifies its class token"):
            net.forward_head(maps[-1].clone())  # any other map than the one just produced


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_a_torchvision_vit_teaches_a_cnn(tmp_path, method):
    t = fusionkd.train(method="baseline", model=VIT, model_kwargs={"image_size": 32}, epochs=1, out_dir=str(tmp_path),
                       name="t", **TINY)
    s = fusionkd.train(method=method, model="resnet8", epochs=1, out_dir=str(tmp_path), name=method,
                       teacher=str(t.run_dir / "best.pt"), teacher_min_accuracy=0, **TINY)
    teacher = load_checkpoint(s.run_dir / "last.pt")["teacher"]
    assert teacher["model"] == VIT and teacher["model_kwargs"] == {"image_size": 32}


def test_a_torchvision_vit_is_refused_as_an_online_peer(tmp_path):
    with pytest.raises(ConfigError, match="vision transformer"):
        fusionkd.train(method="dml", model=VIT, model_kwargs={"image_size": 32}, epochs=1, out_dir=str(tmp_path),
                       name="d", **TINY)
