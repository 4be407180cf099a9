"""fusionkd against the real torchvision and timm (the second environment, ``make test-interop``): its own
``imagenet_*`` networks reproduce torchvision's, ``torchvision:NAME`` / ``timm:NAME`` build on the backbone
contract, and the packages' weights files load through ``weights=``. Skipped where the packages are missing."""

from __future__ import annotations

import logging

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import fusionkd  # noqa: E402
from fusionkd.methods import MethodContext  # noqa: E402
from fusionkd.models import MODELS, HookBackbone, TokenBackbone, create_model  # noqa: E402
from fusionkd.registry import UnknownNameError  # noqa: E402

from .common import tiny  # noqa: E402

pytestmark = pytest.mark.interop

TINY = tiny()


@pytest.mark.parametrize("ours,theirs", [("imagenet_resnet18", "resnet18"), ("imagenet_resnet34", "resnet34"),
                                         ("imagenet_resnet50", "resnet50"), ("imagenet_mobilenet_v2", "mobilenet_v2")])
def test_our_imagenet_networks_are_torchvisions(ours, theirs):
    torch.manual_seed(0)
    ref = torchvision.models.get_model(theirs, weights=None).eval()
    net = create_model(ours, num_classes=1000, in_chans=3).eval()
    net.load_state_dict(ref.state_dict(), strict=True)  # the same keys and shapes, no mapping
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net.forward_head(net.forward_stages(x)[-1]), ref(x), rtol=1e-4, atol=1e-4)


# (name, stage channels, strides): the families whose stage inference is tested
FAMILIES = [
    ("torchvision:resnet18", [64, 128, 256, 512], [4, 8, 16, 32]),
    ("torchvision:mobilenet_v2", [24, 32, 96, 1280], [4, 8, 16, 32]),
    ("torchvision:mobilenet_v3_small", [16, 24, 48, 576], [4, 8, 16, 32]),
    ("torchvision:efficientnet_b0", [24, 40, 112, 1280], [4, 8, 16, 32]),
    ("torchvision:regnet_y_400mf", [48, 104, 208, 440], [4, 8, 16, 32]),
    ("timm:resnet18", [64, 128, 256, 512], [4, 8, 16, 32]),
    ("timm:resnet18.a1_in1k", [64, 128, 256, 512], [4, 8, 16, 32]),
]


@pytest.mark.parametrize("name,channels,strides", FAMILIES)
def test_names_build_on_the_backbone_contract(name, channels, strides):
    entry = MODELS.entry(name)
    package = name.split(":")[0]
    assert entry.description.startswith(f"{package} ") and entry.extras["package"] == package
    net = create_model(name, num_classes=4, in_chans=1).eval()
    assert isinstance(net, HookBackbone) and net.num_classes == 4
    assert [s.channels for s in net.stage_info] == channels and [s.stride for s in net.stage_info] == strides
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        maps = net.forward_stages(x)
        torch.testing.assert_close(net.forward_head(maps[-1]), net(x), rtol=1e-4, atol=1e-5)


def test_a_vit_offers_block_tokens_as_maps_and_its_own_logits_for_the_last_one():
    entry = MODELS.entry("timm:vit_tiny_patch16_224")
    assert entry.extras["tokens"] and entry.extras["image_size"] == 224
    net = create_model("timm:vit_tiny_patch16_224", num_classes=4, in_chans=1).eval()
    assert isinstance(net, TokenBackbone) and net.indices == [2, 5, 8, 11]
    assert [(s.channels, s.stride) for s in net.stage_info] == [(192, 16)] * 4
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        maps = net.forward_stages(x)
        assert [tuple(m.shape) for m in maps] == [(2, 192, 14, 14)] * 4
        torch.testing.assert_close(net.forward_head(maps[-1]), net(x), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="class token"):
            net.forward_head(maps[-1] + 0)  # any other map (a fused one): refused
        with pytest.raises(ValueError, match="class token"):
            net.head.pooled(maps[-1])


def test_unknown_and_unsupported_names_are_refused_with_the_reason():
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet18'"):
        MODELS.entry("torchvision:resnt18")
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet18'"):
        MODELS.entry("timm:resnet19")
    with pytest.raises(UnknownNameError, match="not an image classifier"):
        MODELS.entry("torchvision:fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="Supported: torchvision ResNet"):  # a classifier conv before the pooling
        create_model("torchvision:squeezenet1_1", num_classes=4, in_chans=1)
    with pytest.raises(ValueError, match="timm refused the keyword arguments .*unexpected keyword argument 'img_size'"):
        create_model("timm:resnet18", num_classes=4, in_chans=1, img_size=64)  # package keywords go through


@pytest.mark.parametrize("name,ours", [("torchvision:resnet18", "conv1.weight"),
                                       ("timm:resnet18", "conv1.weight")])
def test_a_package_weights_file_initialises_the_network(tmp_path, name, ours):
    """A 1000-class, 3-channel file of the package into a 4-class, 1-channel network: the body is copied, the
    first convolution summed over its input channels, the classifier replaced; the fusionkd zoo's
    imagenet_resnet18 reads the same file (torchvision's names)."""
    package = torchvision.models.resnet18() if name.startswith("torchvision") else timm.create_model("resnet18")
    path = tmp_path / "w.pth"
    torch.save(package.state_dict(), path)
    file = torch.load(path, weights_only=True)
    for model in (name, "imagenet_resnet18"):
        ctx = MethodContext(model=model, num_classes=4, in_chans=1, image_size=32, epochs=1, weights=str(path))
        net = ctx.create()
        own = net.module.state_dict() if isinstance(net, HookBackbone) else net.state_dict()
        for k, v in file.items():
            if k.startswith("fc."):
                assert own[k].shape[0] == 4
            elif k == ours:
                torch.testing.assert_close(own[k], v.sum(dim=1, keepdim=True))
            else:
                assert torch.equal(own[k], v), k
        assert "replaced" in ctx.weights_report.replaced_classifier


def test_weights_round_trip_through_a_training_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fusionkd")
    torch.manual_seed(0)
    package = timm.create_model("resnet18", num_classes=4, in_chans=1)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(package.state_dict(), path)
    r = fusionkd.train(method="baseline", model="timm:resnet18", weights=str(path), out_dir=str(tmp_path),
                       name="w", **{**TINY, "lr": 1e-9, "weight_decay": 0.0})
    assert r.summary["finished"]
    assert f"{len(package.state_dict())} tensors from {path}" in caplog.text
    net = r.load_deploy_model()
    assert isinstance(net, HookBackbone)
    for k, v in package.state_dict().items():  # lr=1e-9: the run's network is the file's
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(net.module.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
