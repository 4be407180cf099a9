"""The training engine: config validation, exact resume, NaN guard, atomic checkpoints, export, eval, CLI."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import fusionkd
from fusionkd.cli import main
from fusionkd.engine import checkpoint as ckpt_mod
from fusionkd.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fusionkd.engine.config import Config, ConfigError, parse_override, resolve_config
from fusionkd.engine.optim import default_milestones, lr_factor
from fusionkd.engine.trainer import NonFiniteLossError
from fusionkd.methods.baseline import Baseline

TINY = dict(
    method="baseline", model="resnet20", dataset="synthetic",
    dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 96, "test_size": 40},
    image_size=16, val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=2, lr=0.05,
    progress="none", threads=1,
)


def tiny(tmp_path: Path, **kw) -> dict:
    return {**TINY, "out_dir": str(tmp_path / "runs"), "name": "run", **kw}


# ---------------------------------------------------------------------- config
def test_defaults_resolve_and_round_trip():
    cfg = resolve_config({})
    assert cfg.method == "baseline" and cfg.dataset == "fashion-mnist"
    again = resolve_config(cfg.to_dict())
    assert again == cfg


def test_overrides_nested_and_typed(tmp_path):
    assert parse_override("augment.flip=false") == ("augment.flip", False)
    assert parse_override("milestones=[3, 6]") == ("milestones", [3, 6])
    assert parse_override("weight_decay=5e-4") == ("weight_decay", 5e-4)  # YAML 1.1 reads 5e-4 as a string
    assert parse_override("name=run1") == ("name", "run1")
    cfg = resolve_config({}, overrides=["epochs=8", "augment.flip=false", "lr=1", "milestones=[3,6]"])
    assert cfg.epochs == 8 and cfg.augment.flip is False and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    yml = tmp_path / "exp.yaml"
    yml.write_text("epochs: 5\naugment:\n  cutout: 8\n")
    cfg = resolve_config({"epochs": 7}, config_file=yml)
    assert cfg.epochs == 7 and cfg.augment.cutout == 8 and cfg.augment.flip is True


@pytest.mark.parametrize(
    "layer, fragment",
    [
        ({"epochz": 3}, "unknown option 'epochz'. Did you mean 'epochs'"),
        ({"augment": {"flop": True}}, "unknown option 'augment.flop'"),
        ({"method": "fll"}, "unknown method 'fll'"),
        ({"model": "resnet21"}, "Accepted models:"),
        ({"dataset": "cifar1000"}, "unknown dataset"),
        ({"epochs": "ten"}, "epochs: expected an integer"),
        ({"augment": {"flip": "yes"}}, "augment.flip: expected true or false"),
        ({"precision": "fp8"}, "choose one of: fp32, bf16, fp16"),
        ({"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA device"),
        ({"optimizer": "adamw", "nesterov": True}, "nesterov=true needs optimizer=sgd"),
        ({"epochs": 10, "milestones": [5, 12]}, "milestones must be increasing"),
        ({"schedule": "cosine", "milestones": [5]}, "only used by schedule=multistep"),
        ({"models": ["resnet20", "resnet32"]}, "trains one network"),
        ({"teacher": "t.pt"}, "does not use a teacher"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 is out of range: accepted [0, 1)"),
        ({"dataset": "synthetic", "dataset_options": {"classes": 3}}, "accepted dataset_options"),
        ({"options": {"temperature": 4}}, "method 'baseline': unknown option 'options.temperature'"),
    ],
)
def test_bad_configs_are_rejected_with_what_is_accepted(layer, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_config(layer)
    assert fragment in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        resolve_config({}, overrides=["epochs"])


# ---------------------------------------------------------------------- schedules
def test_lr_schedules():
    cfg = Config(epochs=100)
    assert default_milestones(100) == [50, 75]
    assert lr_factor(0, cfg) == 1.0 and lr_factor(49.9, cfg) == 1.0
    assert lr_factor(50, cfg) == pytest.approx(0.1) and lr_factor(80, cfg) == pytest.approx(0.01)
    cos = Config(epochs=10, schedule="cosine")
    assert lr_factor(0, cos) == 1.0 and lr_factor(5, cos) == pytest.approx(0.5) and lr_factor(10, cos) < 1e-12
    warm = Config(epochs=10, schedule="cosine", warmup_epochs=2)
    assert lr_factor(0, warm, 0.25) == pytest.approx(0.125)
    assert lr_factor(1, warm, 0.25) == pytest.approx(0.625)
    assert lr_factor(2, warm) == 1.0
    assert lr_factor(6, warm) == pytest.approx(0.5)


# ---------------------------------------------------------------------- training + run folder
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    return fusionkd.train(**tiny(tmp, epochs=3))


def test_run_folder_contents(finished_run):
    d = finished_run.run_dir
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "train.log"):
        assert (d / name).is_file(), name
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:  # validation every epoch; the test split only once, at the end (eval_test="end")
        assert set(m["val"]) == {"net"} and ("test" in m) == (m["epoch"] == 3)
        assert "loss_ce" in m["train"] and m["img_per_s"] > 0 and m["lr"] > 0
    s = json.loads((d / "summary.json").read_text())
    best_epoch = max(lines, key=lambda m: (m["val"]["net"], -m["epoch"]))["epoch"]
    assert s["best"]["epoch"] == best_epoch and s["best"]["selection"] == "val"
    assert s["last"]["epoch"] == 3 and s["last"]["test"] == lines[-1]["test"]
    assert s["params"]["deploy"] == sum(p.numel() for p in fusionkd.models.create_model(
        "resnet20", num_classes=4, in_chans=1).parameters())
    assert s["params"]["extra"] == 0
    fingerprint = s["data"].pop("fingerprint")
    assert s["data"] == {"train": 72, "val": 24, "test": 40, "name": "synthetic", "subset": None,
                         "val_fraction": 0.25, "data_dir": None}
    assert isinstance(fingerprint, str) and len(fingerprint) == 16
    best = load_checkpoint(d / "best.pt")
    assert best["epoch"] == best_epoch and best["metrics"]["test"] == s["best"]["test"]  # tested on its weights
    assert s["eval_time_s"] > 0
    log = (d / "train.log").read_text()  # filled even though the API caller set up no logging
    assert "baseline on synthetic" in log and "epoch 3 |" in log
    assert finished_run.best_test_accuracy == s["best"]["test"]["net"]


def test_best_epoch_is_tested_on_its_own_weights_and_test_curves_on_request(tmp_path):
    every = fusionkd.train(**tiny(tmp_path, epochs=3, name="every", eval_test="every"))
    end = fusionkd.train(**tiny(tmp_path, epochs=3, name="end"))
    lines = [json.loads(x) for x in (every.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("test" in m for m in lines)
    best = every.summary["best"]
    assert best["test"] == lines[best["epoch"] - 1]["test"]  # same weights, same numbers
    assert end.summary["best"] == best and end.summary["last"] == every.summary["last"]
    a, b = (load_checkpoint(r.run_dir / "last.pt")["method_state"] for r in (every, end))
    assert all(torch.equal(a[k], b[k]) for k in a)  # testing the best weights left the run untouched


def test_learns_something(tmp_path):
    # enough steps (50) for BatchNorm's running statistics to catch up with the weights
    data = {"num_classes": 4, "in_chans": 1, "train_size": 320, "test_size": 40}
    r = fusionkd.train(**tiny(tmp_path, epochs=5, lr=0.05, batch_size=32, dataset_options=data))
    assert r.summary["last"]["test"]["net"] > 40.0  # 4 classes: chance is 25 %


def test_existing_run_folder_is_not_overwritten(tmp_path, finished_run):
    fusionkd.train(**tiny(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        fusionkd.train(**tiny(tmp_path, epochs=1))
    fusionkd.train(**tiny(tmp_path, epochs=1), overwrite=True)


def test_checkpoint_contents(finished_run):
    c = load_checkpoint(finished_run.run_dir / "last.pt")
    assert c["epoch"] == 3 and c["config"]["method"] == "baseline"
    assert c["data"]["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert c["data"]["in_chans"] == 1 and c["data"]["image_size"] == 16 and len(c["data"]["mean"]) == 1
    for key in ("method_state", "optimizer", "scheduler", "rng", "deploy", "metrics", "best"):
        assert key in c
    net = ckpt_mod.build_deploy_model(c)
    assert isinstance(net, torch.nn.Module) and not net.training


# ---------------------------------------------------------------------- exact resume
def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["method_state"]


def test_resume_continues_exactly(tmp_path):
    full = fusionkd.train(**tiny(tmp_path, epochs=4, name="full"))
    part = fusionkd.train(**tiny(tmp_path, epochs=4, name="part"), stop_after=2)
    assert part.summary["finished"] is False and load_checkpoint(part.run_dir / "last.pt")["epoch"] == 2
    assert not (part.run_dir / "summary.json").exists()
    resumed = fusionkd.resume(part.run_dir)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    full_lines = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("test") for m in lines] == [m.get("test") for m in full_lines]
    assert resumed.summary["best"] == full.summary["best"]


def test_resume_through_cli_and_refuses_changed_options(tmp_path):
    args = ["train", "--method", "baseline", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "2",
            "--image-size", "16", "--batch-size", "16", "--progress", "none", "--threads", "1",
            "--out-dir", str(tmp_path), "--name", "cli", "--stop-after", "1",
            "dataset_options={num_classes: 4, in_chans: 1, train_size: 64, test_size: 16}"]
    assert main(args) == 0
    run = tmp_path / "cli"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert main(["train", "--resume", str(run), "lr=0.5"]) == 2  # lr may not change on resume
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["last"]["epoch"] == 2
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0  # extending a finished run
    assert json.loads((run / "summary.json").read_text())["last"]["epoch"] == 3


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither last.pt nor config.yaml"):
        fusionkd.resume(tmp_path)


# ---------------------------------------------------------------------- NaN guard
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good(tmp_path, monkeypatch):
    original = Baseline.training_step
    calls = {"n": 0}

    def poisoned(self, images, labels, epoch):
        terms = original(self, images, labels, epoch)
        calls["n"] += 1
        if epoch == 1 and calls["n"] == 4 + 3:  # 4 steps per epoch: epoch 2, step 3
            terms["loss_ce"] = terms["loss_ce"] * float("nan")
        return terms

    monkeypatch.setattr(Baseline, "training_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3") as e:
        fusionkd.train(**tiny(tmp_path, epochs=3))
    assert "last.pt keeps the last good epoch" in str(e.value)
    good = load_checkpoint(tmp_path / "runs" / "run" / "last.pt")
    assert good["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in good["method_state"].values() if v.is_floating_point())


# ---------------------------------------------------------------------- atomic writes, safe loading
def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": "fusionkd-checkpoint", "version": 1, "x": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "fusionkd-checkpoint", "version": 1, "x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_are_loaded_as_data_only(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "fusionkd-checkpoint", "payload": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(bad)
    not_ours = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_ours)
    with pytest.raises(CheckpointError, match="not a fusionkd checkpoint"):
        load_checkpoint(not_ours)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps([1, 2]) + b"truncated")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------- eval / export / predict
def test_eval_matches_training_metrics(finished_run):
    r = fusionkd.evaluate_checkpoint(finished_run.run_dir / "last.pt", device="cpu")
    last = json.loads((finished_run.run_dir / "summary.json").read_text())["last"]
    assert r["accuracy"]["net"] == pytest.approx(last["test"]["net"])
    conf = np.array(r["confusion_matrix"])
    assert conf.shape == (4, 4) and conf.sum() == 40
    assert r["accuracy"]["net"] == pytest.approx(100 * np.trace(conf) / 40)
    assert set(r["per_class_accuracy"]) == {"class_0", "class_1", "class_2", "class_3"}
    v = fusionkd.evaluate_checkpoint(finished_run.run_dir / "last.pt", split="val", device="cpu")
    assert v["accuracy"]["net"] == pytest.approx(last["val"]["net"])


def test_export_round_trip(finished_run, tmp_path):
    out = tmp_path / "student.pt2"
    w = fusionkd.export_checkpoint(finished_run.run_dir / "best.pt", out, onnx=False)
    assert w["max_abs_diff"] < 1e-4
    program = torch.export.load(str(out)).module()
    net = finished_run.load_deploy_model("best")
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(program(x), net(x), atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "resnet20" and meta["input_shape"] == [1, 16, 16] and len(meta["classes"]) == 4
    deploy = load_checkpoint(out.with_suffix(".pt"))
    assert deploy["format"] == "fusionkd-checkpoint-deploy"
    r = fusionkd.evaluate_checkpoint(out.with_suffix(".pt"), device="cpu")
    assert r["accuracy"]["net"] == pytest.approx(finished_run.summary["best"]["test"]["net"])


def test_predict_png(finished_run, tmp_path):
    """predict's probabilities are the softmax of the deploy network's logits on the normalised image,
    computed here independently: a 16x16 grey PNG (the checkpoint's size and channels) is its own input."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, arr in enumerate(grey):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr, mode="L").save(p)
        paths.append(p)
    data = load_checkpoint(finished_run.run_dir / "best.pt")["data"]
    classes = data["classes"]
    x = torch.from_numpy(np.stack(grey)).float().div(255).unsqueeze(1)
    x = (x - data["mean"][0]) / data["std"][0]
    net = finished_run.load_deploy_model("best").eval()
    with torch.no_grad():
        want = net(x).double().softmax(1)
    res = fusionkd.predict(finished_run.run_dir / "best.pt", paths, topk=len(classes))
    assert [r["image"] for r in res] == [str(p) for p in paths]
    for n, r in enumerate(res):
        top = r["top"]
        assert sorted(t["class"] for t in top) == sorted(classes)  # every class once
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True)  # best first
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
        assert top[0]["class"] == classes[int(want[n].argmax())]
        for t in top:
            assert t["probability"] == pytest.approx(float(want[n, classes.index(t["class"])]), abs=1e-5)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # two different images: two different answers
    short = fusionkd.predict(finished_run.run_dir / "best.pt", paths[:1], topk=2)[0]["top"]
    assert [t["class"] for t in short] == [t["class"] for t in res[0]["top"][:2]]
    assert [t["probability"] for t in short] == pytest.approx([t["probability"] for t in res[0]["top"][:2]], abs=1e-5)
    with pytest.raises(ValueError, match="cannot read image"):
        fusionkd.predict(finished_run.run_dir / "best.pt", [tmp_path / "nope.png"])


# ---------------------------------------------------------------------- CLI
def test_cli_list_and_print_config(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "resnet20" in out and "fashion-mnist" in out
    assert main(["train", "--print-config", "--method", "baseline", "--epochs", "3", "augment.cutout=8"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "cutout: 8" in out


def test_cli_errors_are_clear(capsys):
    assert main(["train", "--method", "nope", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "baseline" in err
    assert main(["eval", "/does/not/exist.pt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_eval_and_export(finished_run, tmp_path, capsys):
    assert main(["eval", str(finished_run.run_dir / "best.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out and "net *" in out
    assert main(["export", str(finished_run.run_dir / "best.pt"), "--out", str(tmp_path / "m.pt2")]) == 0
    assert (tmp_path / "m.pt2").is_file() and (tmp_path / "m.pt").is_file()


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_trains_like_eager_without_falling_back(tmp_path, caplog):
    kw = dict(epochs=1, dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 16})
    eager = fusionkd.train(**tiny(tmp_path, name="eager", **kw))
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        compiled = fusionkd.train(**tiny(tmp_path, name="compiled", compile=True, **kw))
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    a = json.loads((eager.run_dir / "metrics.jsonl").read_text())["train"]["loss"]
    b = json.loads((compiled.run_dir / "metrics.jsonl").read_text())["train"]["loss"]
    assert b == pytest.approx(a, rel=1e-3)


def test_progress_bar_shows_loss_accuracy_speed_and_eta():
    import io

    from fusionkd.engine.progress import Progress

    out = io.StringIO()
    p = Progress("bar", epochs=4, steps_per_epoch=10, stream=out)
    p.step(1, 5, 0.5, 1234.0, 81.25)
    text = out.getvalue()
    assert "epoch 2/4" in text and "5/10" in text and "loss 0.5000" in text and "val 81.25%" in text
    assert "1,234 img/s" in text and "ETA" in text
    p.epoch_end(1, "epoch 2 | summary")
    assert out.getvalue().rstrip().endswith("epoch 2 | summary")


@pytest.mark.slow
def test_export_onnx_when_the_package_is_installed(finished_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    w = fusionkd.export_checkpoint(finished_run.run_dir / "best.pt", tmp_path / "m.pt2", onnx=True)
    model = onnx.load(w["onnx"])
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch size


def test_teacher_check_names_every_mismatch_and_survives_missing_normalisation():
    from fusionkd.data import DatasetInfo
    from fusionkd.engine.trainer import check_teacher_matches

    info = DatasetInfo("fashion-mnist", [f"c{i}" for i in range(10)], (0.286,), (0.353,), 1, 28)
    good = {"data": info.to_dict()}
    check_teacher_matches(good, info, "t.pt")
    with pytest.raises(ConfigError, match=r"dataset 'cifar10' vs 'fashion-mnist'.*3 input channels vs 1"):
        check_teacher_matches({"data": {**info.to_dict(), "name": "cifar10", "in_chans": 3}}, info, "t.pt")
    no_norm = {"data": {k: v for k, v in info.to_dict().items() if k not in ("mean", "std")}}
    with pytest.raises(ConfigError, match="normalisation mean/std None/None"):
        check_teacher_matches(no_norm, info, "t.pt")
