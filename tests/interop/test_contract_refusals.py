"""A package network whose head applied to its last stage map does not give its own logits is refused by name,
never trained with a wrong head (the methods that classify stage maps would train another network than the
one deployed): a head norm (ConvNeXt), a final in-place ReLU (DenseNet: within one forward it rewrites the
captured map and hides the difference), NHWC stage outputs (Swin)."""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from fusionkd.models import create_model  # noqa: E402

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("name, fragment", [
    ("timm:convnext_atto", "does not give its own logits"),
    ("torchvision:densenet121", "does not give its own logits"),
    ("timm:swin_tiny_patch4_window7_224", "cannot be applied to the last stage map"),
])
def test_a_network_off_the_contract_is_refused_naming_why(name, fragment):
    with pytest.raises(ValueError) as e:
        create_model(name, num_classes=10, in_chans=3)
    assert f"model {name!r}" in str(e.value) and "cannot be put on fusionkd's backbone contract" in str(e.value)
    assert fragment in str(e.value)


def test_a_network_on_the_contract_keeps_it():
    from fusionkd.models.external import keeps_contract

    for name in ("torchvision:resnet18", "torchvision:mobilenet_v2", "timm:resnet18"):
        net = create_model(name, num_classes=10, in_chans=3)
        assert keeps_contract(net, 3, 32), name
