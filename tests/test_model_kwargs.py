"""Config ``model_kwargs`` / ``teacher_model_kwargs`` / ``pretrained`` in the core environment (#29).

The keyword arguments go to a network's constructor. For ``torchvision:``/``timm:`` names they are the
package's (tested against the real packages in tests/interop); here a zoo factory's own keyword
(``dropout`` of ``wrn_*``) shows that they are checked, and that they travel with a run: recorded with the
deployed network and the teacher, and used again on resume, eval, export and when the run is a teacher.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import fusionkd
from fusionkd.engine.checkpoint import build_deploy_model, load_checkpoint
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.engine.teachers import teacher_from_meta
from fusionkd.models.registry import model_extras

TINY = dict(dataset="synthetic", dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 16},
            image_size=16, val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=2, lr=0.05,
            progress="none", threads=1)
DROP = {"dropout": 0.3}


def drops(net: torch.nn.Module) -> set[float]:
    """The dropout probability of every block of a WideResNet."""
    return {float(m.dropout) for m in net.modules() if type(m).__name__ == "WideBasicBlock"}


def test_zoo_factories_take_their_own_keywords_only():
    assert model_extras("wrn_16_1", DROP)["source"] == "fusionkd"
    assert model_extras("resnet20", {}) == model_extras("resnet20", None)
    with pytest.raises(ValueError, match="model 'resnet20' takes no keyword argument 'img_size' .*accepts none"):
        model_extras("resnet20", {"img_size": 28})
    with pytest.raises(ValueError, match="'width' .*accepts dropout"):
        model_extras("wrn_16_1", {"width": 2})
    for key in ("num_classes", "in_chans", "pretrained"):
        with pytest.raises(ValueError, match=f"teacher_model_kwargs: '{key}' is set by fusionkd"):
            model_extras("wrn_16_1", {key: 1}, "teacher_model_kwargs")


@pytest.mark.parametrize("overrides,fragment", [
    (["model=resnet20", "model_kwargs={img_size: 28}"], "model='resnet20': model_kwargs: .*'img_size'"),
    (["model=resnet20", "model_kwargs={num_classes: 3}"], "'num_classes' is set by fusionkd"),
    (["method=dml", "models=[wrn_16_1, resnet20]", "model=wrn_16_1", "model_kwargs={dropout: 0.1}"],
     "model='resnet20': model_kwargs: .*'dropout'"),  # the peers take them too
    (["method=kd", "teacher_model=resnet20", "teacher_weights=t.pth", "teacher_model_kwargs={bad: 1}"],
     "teacher_model='resnet20': teacher_model_kwargs: .*'bad'"),
    (["method=kd", "teacher=t.pt", "teacher_model_kwargs={dropout: 0.1}"],
     "teacher_model_kwargs go with teacher_model"),
    (["model=resnet20", "pretrained=true"], "pretrained=true asks torchvision or timm.*weights=FILE"),
    (["model=resnet20", "pretrained=true", "weights=w.pth"], "either pretrained=true .* or weights=FILE"),
])
def test_refused_before_any_work(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(overrides=["dataset=synthetic", *overrides])


def test_kwargs_travel_with_the_run_and_its_teacher(tmp_path):
    out = str(tmp_path / "runs")
    part = fusionkd.train(method="baseline", model="wrn_16_1", model_kwargs=DROP, out_dir=out, name="t", **TINY,
                          stop_after=1)
    assert load_checkpoint(part.run_dir / "last.pt")["deploy"]["model_kwargs"] == DROP
    run = fusionkd.resume(part.run_dir)  # rebuilt from the recorded config: same kwargs, same weights layout
    assert run.summary["finished"] and run.summary["deploy_model"] == "wrn_16_1"
    best = load_checkpoint(run.run_dir / "best.pt")
    assert best["config"]["model_kwargs"] == DROP and best["deploy"]["model_kwargs"] == DROP
    assert drops(build_deploy_model(best)) == {0.3} and drops(run.load_deploy_model("best")) == {0.3}
    r = fusionkd.evaluate_checkpoint(run.run_dir / "best.pt", device="cpu")  # eval rebuilds it the same way
    assert r["accuracy"]["net"] == pytest.approx(run.summary["best"]["test"]["net"])
    exported = tmp_path / "t.pt2"
    assert fusionkd.export_checkpoint(run.run_dir / "best.pt", exported, onnx=False)["max_abs_diff"] < 1e-4
    assert load_checkpoint(exported.with_suffix(".pt"))["deploy"]["model_kwargs"] == DROP

    # the run as a teacher (teacher=best.pt): rebuilt with its kwargs, recorded, and rebuilt again on resume
    kd = fusionkd.train(method="kd", model="resnet20", teacher=str(run.run_dir / "best.pt"), out_dir=out,
                        name="kd", teacher_min_accuracy=0.0, **TINY, stop_after=1)
    meta = load_checkpoint(kd.run_dir / "last.pt")["teacher"]
    assert meta["model"] == "wrn_16_1" and meta["model_kwargs"] == DROP
    info = SimpleNamespace(classes=best["data"]["classes"], in_chans=1)  # what teacher_from_meta reads
    assert drops(teacher_from_meta(meta, info, torch.device("cpu")).model) == {0.3}  # as a resume rebuilds it
    assert fusionkd.resume(kd.run_dir).summary["finished"]

    # the same network as an outside teacher: teacher_model + teacher_weights + teacher_model_kwargs
    out_t = fusionkd.train(method="kd", model="resnet20", teacher_model="wrn_16_1",
                           teacher_weights=str(run.run_dir / "best.pt"), teacher_model_kwargs=DROP,
                           teacher_min_accuracy=0.0, out_dir=out, name="kd-outside", **TINY, stop_after=1)
    assert load_checkpoint(out_t.run_dir / "last.pt")["teacher"]["model_kwargs"] == DROP
    assert fusionkd.resume(out_t.run_dir).summary["finished"]
