"""timm networks whose head is not 'pool -> fc' on their last stage (ConvNeXt: a head norm; EfficientNet: a
1x1 head conv; Swin: channels-last stages and a final norm) through timm's own ``forward_intermediates`` /
``forward_head`` (:class:`fusionkd.models.features.FeaturesBackbone`): the contract holds for any map of the
final features' shape, so they train under offline, online and self methods; byot, which rebuilds the head
from its parts, is refused by name."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import fusionkd  # noqa: E402
from fusionkd.engine.config import ConfigError  # noqa: E402
from fusionkd.models import MODELS, create_model  # noqa: E402
from fusionkd.models.external import keeps_contract  # noqa: E402
from fusionkd.models.features import FeaturesBackbone  # noqa: E402

from .common import tiny  # noqa: E402

pytestmark = pytest.mark.interop

TINY = tiny(epochs=None)


@pytest.mark.parametrize("name, size, chans, strides", [
    ("timm:convnext_atto", 32, [40, 80, 160, 320], [4, 8, 16, 32]),
    ("timm:efficientnet_b0", 32, [24, 40, 112, 1280], [4, 8, 16, 32]),
    ("timm:swin_tiny_patch4_window7_224", 224, [96, 192, 384, 768], [4, 8, 16, 32]),
])
def test_stages_and_head_are_timms_own(name, size, chans, strides):
    torch.manual_seed(0)
    net = create_model(name, num_classes=5, in_chans=3).eval()
    assert isinstance(net, FeaturesBackbone)
    assert [s.channels for s in net.stage_info] == chans and [s.stride for s in net.stage_info] == strides
    reference = timm.create_model(name.split(":", 1)[1], num_classes=5).eval()
    result = reference.load_state_dict({k[len("module."):]: v for k, v in net.state_dict().items()})
    assert not result.missing_keys and not result.unexpected_keys  # exactly timm's keys
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        maps = net.forward_stages(x)
        assert [m.shape[1] for m in maps] == chans and all(m.dim() == 4 for m in maps)  # NCHW, Swin included
        assert torch.allclose(net.forward_head(maps[-1]), reference(x), atol=1e-5)
        assert torch.allclose(net.forward_head(maps[-1].clone()), reference(x), atol=1e-5)  # any map of that shape
    assert keeps_contract(net, 3, size)


def test_a_fixed_input_size_is_known_before_any_work(tmp_path):
    assert MODELS.entry("timm:swin_tiny_patch4_window7_224").extras["image_size"] == 224
    with pytest.raises(ConfigError, match="takes 224x224 images"):
        fusionkd.train(method="baseline", model="timm:swin_tiny_patch4_window7_224", epochs=1, out_dir=str(tmp_path),
                       name="s", **TINY)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("method", ["baseline", "dml", "ffl", "frskd"])
def test_a_convnext_trains_under_baseline_online_and_self_methods(tmp_path, method):
    r = fusionkd.train(method=method, model="timm:convnext_atto", epochs=1, out_dir=str(tmp_path), name=method, **TINY)
    assert r.summary["finished"] and r.summary["model"] == "timm:convnext_atto"


def test_an_efficientnet_student_of_a_convnext_teacher_and_byot_refused(tmp_path):
    t = fusionkd.train(method="baseline", model="timm:convnext_atto", epochs=1, out_dir=str(tmp_path), name="t",
                       **TINY)
    for method in ("kd", "fitnet", "at"):
        s = fusionkd.train(method=method, model="timm:efficientnet_b0", epochs=1, out_dir=str(tmp_path), name=method,
                           teacher=str(t.run_dir / "best.pt"), teacher_min_accuracy=0, **TINY)
        assert s.summary["finished"]
    with pytest.raises(ConfigError, match="method 'byot', model='timm:convnext_atto': .*a method that rebuilds the "
                                          "head from those parts \\(byot\\)"):
        fusionkd.train(method="byot", model="timm:convnext_atto", epochs=1, out_dir=str(tmp_path), name="b", **TINY)
    assert not (tmp_path / "b").exists()  # refused before the data was loaded
