"""The teacher workflow end to end on synthetic data: train a baseline teacher, distil it into a student
with every offline method, mismatched / missing teachers, resume and evaluation without the teacher file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import fusionkd
from fusionkd.cli import main
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import Config, ConfigError
from fusionkd.engine.trainer import warn_if_teacher_saw_validation
from fusionkd.models import create_model

DATA = {"num_classes": 4, "in_chans": 1, "train_size": 96, "test_size": 40}
TINY = dict(
    model="resnet20", dataset="synthetic", dataset_options=DATA, image_size=16, val_fraction=0.25,
    batch_size=16, eval_batch_size=64, lr=0.05, progress="none", threads=1,
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> fusionkd.engine.RunResult:
    """A tiny baseline teacher: step 1 of the two-step recipe (trained until it beats chance: teachers are
    checked on validation before a student trains)."""
    out = tmp_path_factory.mktemp("teacher")
    # 100 % validation accuracy: well above chance
    return fusionkd.train(method="baseline", epochs=20, out_dir=str(out), name="teacher", **TINY)


def teacher_state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["deploy"]["state_dict"]


def two_step_cli(tmp_path: Path, method: str, *options: str) -> tuple[Path, Path]:
    """A 1-epoch baseline teacher, then a 2-epoch ``fusionkd train --method METHOD`` student from it (with
    ``options``, e.g. ``options.beta=4``) on tiny synthetic data: ``(student run folder, teacher best.pt)``."""
    from fusionkd.cli import main

    teacher = fusionkd.train(method="baseline", epochs=1, out_dir=str(tmp_path), name="teacher", **TINY)
    best = teacher.run_dir / "best.pt"
    assert main(["train", "--method", method, "--model", "resnet20", "--dataset", "synthetic",
                 "--teacher", str(best), "--epochs", "2", "--out-dir", str(tmp_path),
                 "--name", method, "image_size=16", "val_fraction=0.25", "batch_size=16", "progress=none",
                 "threads=1", "teacher_min_accuracy=0",  # a 1-epoch teacher: mechanics, not teaching
                 "dataset_options={num_classes: 4, in_chans: 1, train_size: 96, test_size: 40}", *options]) == 0
    return tmp_path / method, best


def assert_option_refused(method: str, options_cls, options: dict, fragment: str) -> None:
    """``options`` are refused by the options' ``validate()`` and, naming the method, by the config."""
    from fusionkd.engine.config import ConfigError, resolve_config

    with pytest.raises(ValueError, match=fragment):
        options_cls(**options).validate()
    with pytest.raises(ConfigError) as e:
        resolve_config({"method": method, "teacher": "t.pt", "options": options})
    assert fragment in str(e.value) and f"method {method!r}" in str(e.value)


def spy_teacher(method) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """What ``method.teacher_forward`` returns, ``(maps, logits)`` per call, recorded from now on."""
    seen: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    original = method.teacher_forward

    def spy(images, raw=False):
        out = original(images, raw)
        seen.append(out)
        return out

    method.teacher_forward = spy
    return seen


def assert_teacher_unchanged(run_ckpt: Path, teacher_ckpt: Path) -> None:
    """The teacher inside the student's checkpoint equals the teacher file: weights and BN statistics."""
    state = load_checkpoint(run_ckpt)["method_state"]
    original = teacher_state(teacher_ckpt)
    inside = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    assert inside.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(inside[k], v), k


@pytest.mark.parametrize("method, extra", [
    ("kd", {}),
    ("fitnet", {}),
    ("at", {"precision": "bf16", "channels_last": True}),
])
def test_two_step_recipe(tmp_path, teacher, method, extra):
    best = teacher.run_dir / "best.pt"
    r = fusionkd.train(method=method, teacher=str(best), epochs=2, out_dir=str(tmp_path), name=method,
                       **{**TINY, **extra})
    s = r.summary
    assert s["finished"] and s["family"] == "offline" and s["heads"] == ["net"] and s["deploy_model"] == "resnet20"
    assert s["method_extras"]["teacher"]["recorded_test_accuracy"] == teacher.best_test_accuracy
    ckpt = load_checkpoint(r.run_dir / "last.pt")
    assert ckpt["teacher"]["model"] == "resnet20" and ckpt["teacher"]["saw_validation_split"] is False
    assert_teacher_unchanged(r.run_dir / "last.pt", best)
    deploy = r.load_deploy_model()
    assert type(deploy) is type(create_model("resnet20", num_classes=4, in_chans=1))


def test_mfkd_end_to_end_resume_and_eval_without_the_teacher_file(tmp_path, teacher):
    teacher_file = tmp_path / "teacher.pt"
    shutil.copy(teacher.run_dir / "best.pt", teacher_file)
    kw = dict(method="mfkd", teacher=str(teacher_file), epochs=3, out_dir=str(tmp_path), name="mfkd",
              eval_test="every", **TINY)
    first = fusionkd.train(stop_after=1, **kw)  # the fusion stage (1 epoch = 10 % of 3, at least 1)
    assert first.summary["finished"] is False
    after_fusion = load_checkpoint(first.run_dir / "last.pt")["method_state"]
    teacher_file.unlink()  # from here on, only the checkpoint knows the teacher
    r = fusionkd.resume(first.run_dir)
    assert r.summary["finished"]
    final = load_checkpoint(r.run_dir / "last.pt")["method_state"]
    fusion_keys = [k for k in final if k.startswith("fusion.")]
    assert fusion_keys and all(torch.equal(after_fusion[k], final[k]) for k in fusion_keys)
    assert any(not torch.equal(after_fusion[k], final[k]) for k in final if k.startswith("net."))
    assert_teacher_unchanged(r.run_dir / "last.pt", teacher.run_dir / "best.pt")

    lines = [__import__("json").loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [set(m["val"]) for m in lines] == [{"net", "fused", "teacher"}, {"net"}, {"net"}]
    assert [set(m["test"]) for m in lines] == [{"net", "fused", "teacher"}, {"net"}, {"net"}]
    assert lines[0]["train"]["loss_feat"] == 0.0 and lines[0]["train"]["loss_fusion_ce"] > 0
    assert lines[1]["train"]["loss_feat"] > 0 and lines[1]["train"]["loss_fusion_ce"] == 0.0
    # the teacher head, evaluated by the student run on the same test split, matches its recorded accuracy
    assert lines[0]["test"]["teacher"] == pytest.approx(teacher.best_test_accuracy)
    extras = r.summary["method_extras"]
    assert extras["fusion_epochs"] == 1 and extras["taps"] == [0, 1, 2]
    assert extras["teacher_val_accuracy"] == pytest.approx(lines[0]["val"]["teacher"])

    res = fusionkd.evaluate_checkpoint(r.run_dir / "best.pt", device="cpu")
    assert set(res["accuracy"]) == {"net"}
    assert res["accuracy"]["net"] == pytest.approx(r.best_test_accuracy)


def test_mismatched_teacher_fails_before_training(tmp_path, teacher):
    other = fusionkd.train(method="baseline", epochs=1, out_dir=str(tmp_path), name="other",
                           **{**TINY, "dataset_options": {**DATA, "num_classes": 5, "in_chans": 3}})
    with pytest.raises(ConfigError) as e:
        fusionkd.train(method="kd", teacher=str(other.run_dir / "best.pt"), epochs=1, out_dir=str(tmp_path),
                       name="student", **TINY)
    msg = str(e.value)
    assert "does not match this run's data" in msg and "5 classes vs 4" in msg and "3 input channels vs 1" in msg
    run = tmp_path / "student"
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists()
    # the same command with the right teacher then just works (no --overwrite needed)
    r = fusionkd.train(method="kd", teacher=str(teacher.run_dir / "best.pt"), epochs=1, out_dir=str(tmp_path),
                       name="student", **TINY)
    assert r.summary["finished"]


def test_missing_or_unreadable_teacher_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="distils from a pre-trained teacher: pass --teacher CHECKPOINT"):
        fusionkd.train(method="mfkd", epochs=2, out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        fusionkd.train(method="kd", teacher=str(tmp_path / "nope.pt"), epochs=1, out_dir=str(tmp_path), **TINY)
    assert main(["train", "--method", "fitnet", "--dataset", "synthetic", "--print-config"]) == 2
    assert "pass --teacher CHECKPOINT" in capsys.readouterr().err


def test_cli_two_step_recipe(tmp_path, teacher):
    assert main(["train", "--method", "kd", "--model", "resnet20", "--dataset", "synthetic",
                 "--teacher", str(teacher.run_dir / "best.pt"), "--epochs", "1", "--out-dir", str(tmp_path),
                 "--name", "kd", "image_size=16", "val_fraction=0.25", "batch_size=16", "progress=none",
                 "threads=1", "dataset_options={num_classes: 4, in_chans: 1, train_size: 96, test_size: 40}",
                 "options.temperature=2"]) == 0
    cfg = load_checkpoint(tmp_path / "kd" / "last.pt")["config"]
    assert cfg["options"] == {"temperature": 2} and cfg["teacher"] == str(teacher.run_dir / "best.pt")


def test_teacher_trained_on_another_validation_split_warns(caplog):
    run = Config(val_fraction=0.1, data_seed=0)
    same = {"val_fraction": 0.1, "data_seed": 0, "dataset_options": {}}
    with caplog.at_level(logging.WARNING, logger="fusionkd"):
        assert warn_if_teacher_saw_validation(same, run, "'t.pt'") is False
        assert not caplog.records
        assert warn_if_teacher_saw_validation({**same, "data_seed": 1}, run, "'t.pt'") is True
        assert warn_if_teacher_saw_validation({**same, "val_fraction": 0.0}, run, "'t.pt'") is True
    assert len(caplog.records) == 2
    assert "probably trained on this run's validation images" in caplog.records[0].getMessage()
    assert warn_if_teacher_saw_validation({**same, "data_seed": 1}, Config(val_fraction=0.0), "x") is False
