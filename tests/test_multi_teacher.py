"""Several teachers for one student: ``teachers=[a/best.pt, b/best.pt]`` (+ ``teacher_mix``) for kd, dkd, dist.

The ensemble's logits are the weighted mean of the members' (checked by hand); each member and the mix are
checked against chance before training; the ensemble travels in the checkpoint, so a resumed run equals an
uninterrupted one; the methods that read teacher maps, and malformed lists, are refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_offline_engine import TINY

import fusionkd
from fusionkd.cli import main
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.methods import EnsembleTeacher
from fusionkd.models import create_model

STUDENT = ["--model", "resnet8", "--dataset", "synthetic", "--out-dir", "OUT", "image_size=16",
           "val_fraction=0.25", "batch_size=16", "progress=none", "threads=1", "eval_batch_size=64",
           "dataset_options={num_classes: 4, in_chans: 1, train_size: 96, test_size: 40}"]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory) -> tuple[Path, Path]:
    """Two real baseline runs of different networks (resnet8, resnet14), trained for 8 epochs: they teach."""
    out = tmp_path_factory.mktemp("teachers")
    a = fusionkd.train(method="baseline", epochs=8, out_dir=str(out), name="a", **{**TINY, "model": "resnet8"})
    b = fusionkd.train(method="baseline", epochs=8, out_dir=str(out), name="b", **{**TINY, "model": "resnet14"})
    return a.run_dir / "best.pt", b.run_dir / "best.pt"


def _student(tmp_path: Path, method: str, *options: str, name: str = "s") -> int:
    argv = [a.replace("OUT", str(tmp_path)) for a in STUDENT]
    return main(["train", "--method", method, *argv, "--name", name, *options])


def test_ensemble_logits_are_the_weighted_mean_by_hand():
    torch.manual_seed(0)
    nets = [create_model("resnet8", num_classes=3, in_chans=1).eval() for _ in range(2)]
    ens = EnsembleTeacher(nets, [3.0, 1.0]).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        za, zb = nets[0](x), nets[1](x)
        expected = 0.75 * za + 0.25 * zb  # weights normalised: 3/4, 1/4
        assert torch.allclose(ens(x), expected, atol=1e-6)
        assert torch.allclose(EnsembleTeacher(nets)(x), (za + zb) / 2, atol=1e-6)  # default: equal
    assert ens.mix.tolist() == [0.75, 0.25] and (ens.num_classes, ens.in_chans) == (3, 1)
    with pytest.raises(ValueError, match="two or more"):
        EnsembleTeacher(nets[:1])
    with pytest.raises(ValueError, match="disagree on classes"):
        EnsembleTeacher([nets[0], create_model("resnet8", num_classes=5, in_chans=1)])


@pytest.mark.parametrize("method", ["kd", "dkd", "dist"])
def test_a_student_learns_from_two_teachers(tmp_path, two_teachers, method):
    a, b = two_teachers
    teachers = f"teachers=[{a}, {b}]"
    assert _student(tmp_path, method, "--epochs", "2", teachers, "teacher_mix=[2, 1]", name="full") == 0
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    t = summary["method_extras"]["teacher"]
    assert t["model"] == "ensemble(resnet8, resnet14)" and t["source"] == "teachers"
    # each member and the mix were checked on the validation split, before training
    ckpt = load_checkpoint(tmp_path / "full" / "last.pt")
    members = ckpt["teacher"]["members"]
    assert [m["path"] for m in members] == [str(a), str(b)] and ckpt["teacher"]["mix"] == pytest.approx([2 / 3, 1 / 3])
    assert all(m["check"]["split"] == "validation" and m["check"]["accuracy"] > 25 for m in members)
    assert t["check"]["accuracy"] > 25
    # the teachers inside the checkpoint are the files' networks, frozen
    state = ckpt["method_state"]
    for i, path in enumerate((a, b)):
        original = load_checkpoint(path)["deploy"]["state_dict"]
        inside = {k[len(f"teacher.members.{i}."):]: v for k, v in state.items()
                  if k.startswith(f"teacher.members.{i}.")}
        assert inside.keys() == original.keys() and all(torch.equal(inside[k], original[k]) for k in original)


def test_stop_and_resume_with_two_teachers_equals_a_straight_run(tmp_path, two_teachers):
    a, b = two_teachers
    common = dict(TINY, model="resnet8", method="kd", teachers=[str(a), str(b)], teacher_mix=[1, 3], epochs=2)
    straight = fusionkd.train(out_dir=str(tmp_path), name="straight", **common)
    from fusionkd.engine.trainer import Trainer

    cut = resolve_config(dict(common, out_dir=str(tmp_path), name="cut"))
    trainer = Trainer(cut)
    trainer.stop_after = 1
    trainer.fit()
    moved = tmp_path / "moved"  # the teacher files need not be there on resume: the checkpoint holds them
    moved.mkdir()
    for p in (a, b):
        p.rename(moved / f"{p.parent.name}.pt")
    try:
        resumed = fusionkd.resume(tmp_path / "cut")
    finally:
        for p in (a, b):
            (moved / f"{p.parent.name}.pt").rename(p)
    s1 = load_checkpoint(straight.run_dir / "last.pt")["method_state"]
    s2 = load_checkpoint(resumed.run_dir / "last.pt")["method_state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("options, fragment", [
    ({"method": "fitnet"}, "cannot learn from several teachers: it reads the teacher's stage maps"),
    ({"method": "baseline"}, "cannot learn from several teachers: it uses no teacher"),
    ({"teachers": ["a.pt"]}, "teachers takes two or more teachers, got 1"),
    ({"teacher": "a.pt"}, "give teachers=[...] or one teacher"),
    ({"teacher_mix": [1.0]}, "teacher_mix has 1 weights for 2 teachers"),
    ({"teacher_mix": [1.0, -1.0]}, "must be finite numbers >= 0, not all 0"),
    ({"teacher_mix": [0.0, 0.0]}, "must be finite numbers >= 0, not all 0"),
    ({"teacher_mix": [1.0, float("nan")]}, "teacher_mix: expected list[float]"),  # the type check: finite
    ({"teachers": ["a.pt", "resnet5=b.pth"]}, "unknown model 'resnet5'"),
    ({"teachers": ["a.pt", "resnet56="]}, "names no file"),
    ({"teachers": ["a.pt", {"model": "resnet14", "weights": "b.pth", "kwarg": {}}]}, "unknown key 'kwarg'; a mapping"),
    ({"teachers": ["a.pt", {"model": "resnet14"}]}, "needs model: NAME and weights: FILE"),
    ({"teachers": ["a.pt", {"model": "resnet14", "weights": "b.pth", "kwargs": [1]}]}, "kwargs must be a mapping"),
    ({"teachers": ["a.pt", {"model": "mobilenetv2", "weights": "b.pth", "kwargs": {"width": 1}}]},
     "teachers item 'mobilenetv2': kwargs: model 'mobilenetv2' takes no keyword argument 'width' (it accepts width"),
    ({"teachers": ["a.pt", {"model": "resnet5", "weights": "b.pth"}]}, "unknown model 'resnet5'"),
    ({"teachers": ["a.pt", 3]}, "teachers: expected list[str | dict[str, Any]] | None, got ['a.pt', 3]"),
])
def test_bad_teacher_lists_are_refused_before_any_work(options, fragment):
    cfg = {"method": "kd", "teachers": ["a.pt", "b.pt"], **options}
    with pytest.raises(ConfigError) as e:
        resolve_config(cfg)
    assert fragment in str(e.value)
    if "several teachers: it reads" in fragment:
        assert "dist, dkd, kd" in str(e.value)  # what is accepted


def test_teacher_mix_without_teachers_and_missing_files_are_refused(tmp_path, two_teachers, capsys):
    with pytest.raises(ConfigError, match="teacher_mix weighs the logits of teachers"):
        resolve_config({"method": "kd", "teacher": "a.pt", "teacher_mix": [1, 2]})
    a, _ = two_teachers
    code = _student(tmp_path, "kd", "--epochs", "1", f"teachers=[{a}, {tmp_path / 'nowhere.pt'}]")
    assert code == 2
    assert f"teachers: '{tmp_path / 'nowhere.pt'}': no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_member_at_chance_is_refused_by_name(tmp_path, two_teachers, capsys):
    a, _ = two_teachers
    weak = fusionkd.train(method="baseline", epochs=1, out_dir=str(tmp_path), name="weak", lr=1e-9,
                          **{k: v for k, v in TINY.items() if k != "lr"})  # lr 1e-9: untrained
    code = _student(tmp_path, "kd", "--epochs", "1", f"teachers=[{a}, {weak.run_dir / 'best.pt'}]")
    err = capsys.readouterr().err
    assert code == 2 and "no better than chance" in err and str(weak.run_dir / "best.pt") in err


def test_an_outside_teacher_is_a_member_as_name_equals_file(tmp_path, two_teachers):
    a, b = two_teachers
    plain = tmp_path / "b.pth"  # the resnet14 teacher as a plain state dict, from outside fusionkd
    torch.save(load_checkpoint(b)["deploy"]["state_dict"], plain)
    assert _student(tmp_path, "kd", "--epochs", "1", f"teachers=[{a}, resnet14={plain}]") == 0
    t = load_checkpoint(tmp_path / "s" / "last.pt")["teacher"]
    assert t["members"][1]["source"] == "teacher_model" and t["members"][1]["weights"] == str(plain)
    assert t["members"][0]["path"] == str(a)


def test_an_outside_member_takes_its_package_keywords_as_a_mapping(tmp_path, two_teachers, capsys):
    """``{model, weights, kwargs}``: the keywords reach the constructor (a mobilenetv2 at width 0.25, whose file
    does not load into the default width 0.5), travel in the checkpoint and rebuild the member on resume."""
    a, _ = two_teachers
    narrow = fusionkd.train(method="baseline", epochs=8, out_dir=str(tmp_path), name="narrow",
                            model_kwargs={"width_mult": 0.25}, **{**TINY, "model": "mobilenetv2"})
    plain = tmp_path / "narrow.pth"
    torch.save(load_checkpoint(narrow.run_dir / "best.pt")["deploy"]["state_dict"], plain)
    assert _student(tmp_path, "kd", "--epochs", "1", f"teachers=[{a}, mobilenetv2={plain}]", name="wide") == 2
    err = capsys.readouterr().err  # the file is not of the default width
    assert f"teachers item 'mobilenetv2={plain}': teacher_weights: the weights in" in err
    assert "do not fit the teacher 'mobilenetv2'" in err and "shape mismatch stem.0.weight: (8, 1, 3, 3)" in err
    item = f"{{model: mobilenetv2, weights: {plain}, kwargs: {{width_mult: 0.25}}}}"  # YAML on the command line
    # (a mobilenetv2 learns little of this data in 8 epochs: the chance check is lowered for it)
    assert _student(tmp_path, "kd", "--epochs", "1", f"teachers=[{a}, {item}]", "teacher_min_accuracy=0",
                    name="cli") == 0
    member = {"model": "mobilenetv2", "weights": str(plain), "kwargs": {"width_mult": 0.25}}
    kw = dict(TINY, model="resnet8", method="kd", teachers=[str(a), member], epochs=2, out_dir=str(tmp_path),
              teacher_min_accuracy=0.0)
    fusionkd.train(name="cut", stop_after=1, **kw)
    t = load_checkpoint(tmp_path / "cut" / "last.pt")["teacher"]
    assert t["members"][1]["model_kwargs"] == {"width_mult": 0.25}
    plain.unlink()  # the resumed run rebuilds the member from its checkpoint, with its keywords
    assert fusionkd.resume(tmp_path / "cut").summary["finished"]


def test_compare_hands_the_teachers_to_the_offline_runs_only(tmp_path, two_teachers):
    from fusionkd.compare.grid import CompareSpec, plan

    a, b = two_teachers
    spec = CompareSpec(methods=["baseline", "kd", "dkd"], models=["resnet8"], seeds=[0], out=tmp_path / "c",
                       common={**{k: v for k, v in TINY.items() if k not in ("model", "progress", "threads")},
                               "teachers": [str(a), str(b)], "teacher_mix": [1, 1]})
    _, tasks = plan(spec)
    cfg = {t.method: t.config for t in tasks}
    assert cfg["baseline"].teachers is None and cfg["kd"].teachers == [str(a), str(b)]
    assert cfg["dkd"].teacher_mix == [1, 1]
