"""torchvision families whose head is more than ``pooling -> classifier`` go on the backbone contract through
their own tail (``models/tv_tails.py``): ConvNeXt (a head LayerNorm2d), Swin v1/v2 (channels-last stages, a final
norm), DenseNet (a final in-place ReLU), ShuffleNetV2 (no ``features`` sequence), VGG and AlexNet (two fully
connected layers before the classifier) and MaxViT. For each: ``forward_head(forward_stages(x)[-1])`` equals the
network's own logits, on two separate forwards (within one, DenseNet's in-place ReLU would rewrite the captured
map and hide a difference), in eval mode, and in training mode where nothing is random (no stochastic depth
or dropout); the state dict is torchvision's; a network whose head cannot be put on the contract (SqueezeNet,
GoogLeNet, Inception v3) is refused naming why. Training through the Python API: an online method on a
ConvNeXt, a self method on Swin's channels-last maps, mfkd from a DenseNet teacher file; byot refused."""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import fusionkd  # noqa: E402
from fusionkd.engine.config import ConfigError  # noqa: E402
from fusionkd.models import MODELS, HookBackbone, create_model  # noqa: E402
from fusionkd.models.external import keeps_contract  # noqa: E402

from .common import tiny  # noqa: E402

pytestmark = pytest.mark.interop

TINY = tiny(train_size=32, test_size=8, batch_size=8, lr=0.01)

# (name, input side, stage channels): every family of tv_tails, strides 4/8/16/32 (AlexNet: measured 4/8/17/37)
FAMILIES = [
    ("convnext_tiny", 32, [96, 192, 384, 768]),
    ("swin_t", 32, [96, 192, 384, 768]),
    ("swin_v2_t", 32, [96, 192, 384, 768]),
    ("densenet121", 32, [256, 512, 1024, 1024]),
    ("shufflenet_v2_x0_5", 32, [24, 48, 96, 1024]),
    ("vgg11_bn", 32, [256, 512, 512, 512]),
    ("alexnet", 224, [64, 192, 256, 256]),
    ("maxvit_t", 224, [64, 128, 256, 512]),
]


@pytest.mark.parametrize("arch,size,channels", FAMILIES)
def test_the_family_keeps_the_contract_with_its_own_tail(arch, size, channels):
    torch.manual_seed(0)
    net = create_model(f"torchvision:{arch}", num_classes=4, in_chans=3)
    assert isinstance(net, HookBackbone) and net.num_classes == 4
    assert [s.channels for s in net.stage_info] == channels
    strides = [s.stride for s in net.stage_info]
    assert strides == ([4, 8, 17, 37] if arch == "alexnet" else [4, 8, 16, 32])
    ref = torchvision.models.get_model(arch, weights=None, num_classes=4)
    assert list(net.state_dict()) == [f"module.{k}" for k in ref.state_dict()]  # torchvision's keys, nothing added
    assert keeps_contract(net, 3, size)  # eval mode, two separate forwards
    x = torch.randn(2, 3, size, size)
    maps = net.forward_stages(x)
    assert [m.shape[1] for m in maps] == channels and all(m.dim() == 4 for m in maps)  # NCHW, also Swin's
    if arch.startswith("swin"):  # the channels-last stage output, offered permuted
        assert maps[0].shape[-1] == size // 4
    if arch == "densenet121":  # read before the forward's in-place ReLU: a BN output, negative values kept
        assert (maps[-1] < 0).any()
    net.eval()
    with torch.no_grad():  # the head applies to any map of the last shape (a fused map): the tail, then the fc
        other = torch.randn_like(maps[-1])
        torch.testing.assert_close(net.forward_head(other), net.head(other))
        torch.testing.assert_close(net.forward_head(other), net.head.fc(net.head.pooled(other)))
    if arch in ("densenet121", "shufflenet_v2_x0_5"):  # training mode (batch statistics), where nothing is random
        net.train()
        torch.testing.assert_close(net.forward_head(net.forward_stages(x)[-1]), net(x), rtol=1e-4, atol=1e-4)


def test_maxvit_names_its_fixed_input_size_before_any_work(tmp_path):
    assert MODELS.entry("torchvision:maxvit_t").extras["image_size"] == 224
    with pytest.raises(ConfigError, match="takes 224x224 images"):
        fusionkd.train(method="baseline", model="torchvision:maxvit_t", out_dir=str(tmp_path), **TINY)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch, fragment", [
    ("squeezenet1_0", "a 1x1 convolution applied before the global pooling"),
    ("googlenet", "auxiliary classifiers"),
    ("inception_v3", "auxiliary classifier"),
])
def test_a_family_off_the_contract_is_refused_naming_why(arch, fragment):
    with pytest.raises(ValueError) as e:
        create_model(f"torchvision:{arch}", num_classes=10, in_chans=3)
    message = str(e.value)
    assert f"model 'torchvision:{arch}'" in message and "cannot be put on fusionkd's backbone contract" in message
    assert fragment in message and "ConvNeXt, Swin, DenseNet" in message


def test_the_older_families_keep_the_contract():
    for name in ("torchvision:resnet18", "torchvision:mobilenet_v2", "timm:resnet18"):
        assert keeps_contract(create_model(name, num_classes=10, in_chans=3), 3, 32), name


def test_an_online_method_trains_a_convnext_and_a_self_method_a_swin(tmp_path):
    r = fusionkd.train(method="ffl", model="torchvision:convnext_tiny", out_dir=str(tmp_path), name="ffl", **TINY)
    assert r.summary["finished"]
    r = fusionkd.train(method="frskd", model="torchvision:swin_t", out_dir=str(tmp_path), name="frskd", **TINY)
    assert r.summary["finished"]


def test_mfkd_from_a_densenet_teacher_file(tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.densenet121(num_classes=4)
    teacher.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(teacher.state_dict(), tmp_path / "densenet.pth")
    r = fusionkd.train(method="mfkd", model="resnet20", teacher_model="torchvision:densenet121",
                       teacher_weights=str(tmp_path / "densenet.pth"), teacher_min_accuracy=0.0,
                       out_dir=str(tmp_path), name="mfkd", **{**TINY, "epochs": 2})
    assert r.summary["finished"]


def test_byot_leaves_a_network_that_does_not_build_to_the_real_build_which_names_why(tmp_path):
    """check_head_parts cannot build SqueezeNet (refused family): it defers, and the run's own build refuses it."""
    with pytest.raises(ValueError, match="SqueezeNet.*a 1x1 convolution applied before the global pooling"):
        fusionkd.train(method="byot", model="torchvision:squeezenet1_0", out_dir=str(tmp_path), **TINY)


def test_byot_refuses_a_network_with_its_own_tail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="method 'byot', model='torchvision:convnext_tiny': ConvNeXt's head is its "
                                          "own tail \\(convnext_tail.*\\(byot\\) cannot use this network"):
        fusionkd.train(method="byot", model="torchvision:convnext_tiny", out_dir=str(tmp_path), **TINY)
    assert not any(tmp_path.iterdir())


def test_a_torchvision_weights_file_of_a_tailed_family_initialises_it(tmp_path):
    """torchvision's 1000-class, 3-channel ConvNeXt file into a 4-class, 1-channel run: the body is copied, the
    first convolution summed over its input channels, the classifier (``classifier.2``, after the tail's norm)
    replaced."""
    from fusionkd.methods import MethodContext

    path = tmp_path / "convnext.pth"
    torch.save(torchvision.models.convnext_tiny().state_dict(), path)
    file = torch.load(path, weights_only=True)
    ctx = MethodContext(model="torchvision:convnext_tiny", num_classes=4, in_chans=1, image_size=32, epochs=1,
                        weights=str(path))
    own = ctx.create().module.state_dict()
    for k, v in file.items():
        if k.startswith("classifier.2."):
            assert own[k].shape[0] == 4
        elif k == "features.0.0.weight":
            torch.testing.assert_close(own[k], v.sum(dim=1, keepdim=True))
        else:
            assert torch.equal(own[k], v), k
    assert "classifier.2" in ctx.weights_report.replaced_classifier
