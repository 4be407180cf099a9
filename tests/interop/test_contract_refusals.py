"""A package network whose head applied to its last stage map does not give its own logits is refused by name,
never trained with a wrong head (the methods that classify stage maps would train another network than the
one deployed): torchvision's DenseNet (a final in-place ReLU: within one forward it rewrites the captured map
and hides the difference), ConvNeXt (a 7x7 LayerNorm head) and Swin (channels-last stages). timm's ConvNeXt,
EfficientNet and Swin come in through timm's own API instead (tests/interop/test_timm_features.py)."""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from fusionkd.models import create_model  # noqa: E402

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("name, fragment", [
    ("torchvision:densenet121", "does not give its own logits"),
    ("torchvision:convnext_tiny", "cannot be applied to the last stage map"),
    ("torchvision:swin_t", "fusionkd cannot tell its stages"),
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
