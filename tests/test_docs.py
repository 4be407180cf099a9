"""The docs stay true: the config reference matches the schema, the README's two set-up commands exist,
and the "adding a method" example in docs/engine.md runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

import fusionkd
from fusionkd.engine.config import AugmentConfig, Config
from fusionkd.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_generated_from_the_schema():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == gen.render(), "docs/config.md is stale: run `python scripts/gen_config_doc.py`"
    for f in dataclasses.fields(Config):
        assert f"`{f.name}`" in text
    for f in dataclasses.fields(AugmentConfig):
        assert f"`augment.{f.name}`" in text


def test_readme_states_exactly_two_setup_commands_that_exist_in_the_makefile():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and run", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_adding_a_method_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "engine.md").read_text()
    code = re.search(r"```python\n# my_kd.py\n(.*?)```", text, re.S).group(1)
    (tmp_path / "my_kd.py").write_text(code)  # used as the docs say: a --plugin file
    try:
        r = fusionkd.train(
            method="my_kd", model="resnet20", dataset="synthetic", image_size=16, epochs=1, batch_size=16,
            dataset_options={"num_classes": 3, "in_chans": 1, "train_size": 48, "test_size": 12},
            out_dir=str(tmp_path), progress="none", threads=1, options={"temperature": 4},
            plugins=[str(tmp_path / "my_kd.py")],
        )
        assert METHODS.entry("my_kd").extras["source"] == f"file {tmp_path / 'my_kd.py'}"
        assert set(r.summary["last"]["test"]) == {"a", "b"}
        assert r.summary["params"]["extra"] == r.summary["params"]["deploy"]
    finally:
        METHODS._entries.pop("my_kd", None)
    with pytest.raises(Exception, match="unknown method 'my_kd'"):
        fusionkd.train(method="my_kd")


@pytest.mark.parametrize("label", ["zoo name", "weights file", "module object"])
def test_models_md_three_ways_in_examples_run(tmp_path, monkeypatch, label):
    """docs/models.md's runnable example for each way in (zoo name, weights file, module object)."""
    text = (ROOT / "docs" / "models.md").read_text()
    code = re.search(rf"```python\n# example: {label}\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"models_md_{label.replace(' ', '_')}"}
    exec(compile(code, f"docs/models.md ({label})", "exec"), namespace)
    r = namespace["r"]
    assert r.summary["finished"] and (tmp_path / "runs" / "docs").is_dir()
    if label == "weights file":
        assert "classifier 'fc' replaced" in (r.run_dir / "train.log").read_text()
    if label == "module object":
        assert r.summary["deploy_model"] == "user-smallresnetlike"
        assert r.summary["heads"] == ["branch1", "branch2", "branch3", "net"]
