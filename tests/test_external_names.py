"""``torchvision:NAME`` / ``timm:NAME`` model names in the core environment (neither package installed): the
registry's resolver mechanism with a fake resolver, and the names refused with the install hint where the
package is missing. The real packages are tested in tests/interop (a second environment)."""

from __future__ import annotations

import importlib.util

import pytest

import fusionkd
from fusionkd.engine.config import ConfigError
from fusionkd.models import EXTERNAL_PREFIXES, MODELS
from fusionkd.registry import Registry, UnknownNameError

TINY = dict(dataset="synthetic", dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 32, "test_size": 8},
            image_size=16, val_fraction=0.25, batch_size=16, epochs=1, progress="none", threads=1)


def test_a_resolver_registers_the_exact_name_on_first_lookup_only():
    calls = []

    def resolve(name):
        calls.append(name)
        if name == "fake:bad":
            raise UnknownNameError(f"unknown thing {name!r}: the fake package has no 'bad'")
        return (lambda: name.upper()), f"fake {name}", {"package": "fake"}

    reg: Registry = Registry("thing")
    reg.register("plain", "a registered thing")(lambda: "plain")
    reg.add_resolver("fake:", resolve)
    assert calls == []  # nothing is resolved before a name of the prefix is looked up
    assert reg.names() == ["plain"]
    entry = reg.entry("fake:one")
    assert entry.obj() == "FAKE:ONE" and entry.description == "fake fake:one"
    assert entry.extras == {"source": "resolver fake:", "package": "fake"}
    assert reg.get("fake:one") is entry.obj and "fake:one" in reg and calls == ["fake:one"]  # resolved once
    assert reg.names() == ["plain", "fake:one"]
    assert "fake:bad" not in reg
    with pytest.raises(UnknownNameError, match="no 'bad'"):
        reg.entry("fake:bad")
    with pytest.raises(UnknownNameError, match="or fake:NAME"):  # names without the prefix: the usual error
        reg.entry("plian")
    assert "other:one" not in reg
    with pytest.raises(ValueError):
        reg.add_resolver("", resolve)


def test_the_model_registry_serves_both_prefixes():
    assert set(MODELS.resolver_prefixes()) == set(EXTERNAL_PREFIXES) == {"torchvision:", "timm:"}
    with pytest.raises(UnknownNameError, match="torchvision:NAME / timm:NAME"):
        MODELS.entry("resnet21")


@pytest.mark.parametrize("package,name", [("torchvision", "torchvision:resnet18"), ("timm", "timm:resnet18")])
def test_a_missing_package_is_named_with_the_install_command(tmp_path, package, name):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here (tests/interop covers it)")
    hint = f"needs {package}, which is not installed here: pip install 'fusionkd\\[interop\\]'"
    assert name not in MODELS
    with pytest.raises(UnknownNameError, match=hint):
        MODELS.entry(name)
    with pytest.raises(ConfigError, match=hint):
        fusionkd.train(method="baseline", model=name, out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match="teacher_model: .*" + hint):
        fusionkd.train(method="kd", model="resnet20", teacher_model=name, teacher_weights=str(tmp_path / "t.pth"),
                       out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match=hint):
        fusionkd.train(method="dml", model="resnet20", models=["resnet20", name], out_dir=str(tmp_path), **TINY)
