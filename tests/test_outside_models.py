"""Networks and weights from outside fusionkd: ``weights=FILE``, ``teacher_model`` + ``teacher_weights``, user
module objects (``HookBackbone`` and inferred stages) in every stage-reading method, and their refusals.

All on synthetic data with real files written here (torch.save'd state dicts, safetensors, checkpoints).
The user modules are plain-torch classes shaped like torchvision's and timm's models (neither package is
installed here).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fusionkd
from fusionkd.cli import main
from fusionkd.compare.grid import CompareSpec, plan
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError
from fusionkd.methods import MethodContext
from fusionkd.models import (
    HookBackbone,
    WeightsError,
    adapt_module,
    create_model,
    infer_stages,
    load_weights_file,
)

DATA = {"num_classes": 4, "in_chans": 1, "train_size": 192, "test_size": 40}
TINY = dict(dataset="synthetic", dataset_options=DATA, image_size=16, val_fraction=0.25, batch_size=16,
            eval_batch_size=64, lr=0.05, progress="none", threads=1)


# ----------------------------------------------------------------------------- user modules
def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TVStyleResNet(nn.Module):
    """Shaped like torchvision's ResNet (conv1 bn1 relu layer1..4 avgpool fc), small widths."""

    def __init__(self, num_classes: int = 4, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = _block(8, 8, 1)
        self.layer2 = _block(8, 16, 2)
        self.layer3 = _block(16, 24, 2)
        self.layer4 = _block(24, 32, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TimmStyleNet(nn.Module):
    """Shaped like a timm model: ``feature_info`` (module, num_chs, reduction) and ``get_classifier()``."""

    def __init__(self, num_classes: int = 4, in_chans: int = 1) -> None:
        super().__init__()
        self.stem = _block(in_chans, 8, 2)
        self.stages = nn.Sequential(_block(8, 16, 2), _block(16, 24, 2), _block(24, 32, 2))
        self.head = nn.Linear(32, num_classes)
        self.feature_info = [dict(num_chs=8, reduction=2, module="stem"),
                             dict(num_chs=16, reduction=4, module="stages.0"),
                             dict(num_chs=24, reduction=8, module="stages.1"),
                             dict(num_chs=32, reduction=16, module="stages.2")]

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> fusionkd.engine.RunResult:
    """A baseline resnet20 trained to well above chance on the synthetic data (73 % validation)."""
    out = tmp_path_factory.mktemp("teacher")
    return fusionkd.train(method="baseline", model="resnet20", epochs=4, out_dir=str(out), name="t", **TINY)


@pytest.fixture(scope="module")
def teacher_file(teacher_run, tmp_path_factory) -> Path:
    """The teacher's weights as a user would have them: ``torch.save(model.state_dict(), 'x.pth')``."""
    path = tmp_path_factory.mktemp("weights") / "resnet20_synthetic.pth"
    torch.save(teacher_run.load_deploy_model().state_dict(), path)
    return path


# ----------------------------------------------------------------------------- weights=FILE
def test_weights_initialise_the_network_and_a_classifier_of_another_size_is_replaced(teacher_file):
    file = torch.load(teacher_file, weights_only=True)
    ctx = MethodContext(model="resnet20", num_classes=3, in_chans=1, image_size=16, epochs=1,
                        weights=str(teacher_file))
    net = ctx.create()
    own = net.state_dict()
    for k, v in file.items():
        if k.startswith("head.fc."):
            assert own[k].shape[0] == 3  # fresh 3-class classifier
        else:
            assert torch.equal(own[k], v), k
    assert "replaced" in ctx.weights_report.replaced_classifier
    # a deploy network assembled from branches is not initialised from the file
    fresh = ctx.create(pretrained=False)
    assert not torch.equal(fresh.state_dict()["stem.0.weight"], file["stem.0.weight"])


def test_weights_round_trip_through_the_api(tmp_path, teacher_file, caplog):
    caplog.set_level(logging.INFO, logger="fusionkd")
    r = fusionkd.train(method="baseline", model="resnet20", weights=str(teacher_file), epochs=1,
                       out_dir=str(tmp_path), name="w", **{**TINY, "dataset_options": {**DATA, "num_classes": 3}})
    assert r.summary["finished"]
    assert "classifier 'head.fc' replaced" in caplog.text
    assert "classifier 'head.fc' replaced" in (r.run_dir / "train.log").read_text()
    assert r.load_deploy_model().head.fc.out_features == 3
    # resuming does not read the file again (it may be gone): the checkpoint holds the weights
    moved = tmp_path / "gone.pth"
    teacher_file.rename(moved)
    try:
        assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2
    finally:
        moved.rename(teacher_file)


def test_weights_round_trip_through_the_cli(tmp_path, teacher_file):
    rc = main(["train", "--method", "dml", "--model", "resnet20", "--dataset", "synthetic",
               "dataset_options={num_classes: 3, in_chans: 1, train_size: 64, test_size: 16}", "image_size=16",
               "epochs=1", "batch_size=16", "threads=1", "progress=none", f"out_dir={tmp_path}", "name=cli",
               f"weights={teacher_file}"])
    assert rc == 0
    log_text = (tmp_path / "cli" / "train.log").read_text()
    assert f"weights={teacher_file}" in log_text and "replaced" in log_text
    state = load_checkpoint(tmp_path / "cli" / "last.pt")["method_state"]
    assert any(k.startswith("peers.members.1.") for k in state)  # every peer started from the file


def test_safetensors_wrapped_prefixed_and_checkpoint_files(tmp_path, teacher_file, teacher_run):
    from safetensors.torch import save_file

    state = torch.load(teacher_file, weights_only=True)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    wrapped = tmp_path / "ddp.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    for path, kind in ((st, "safetensors"), (wrapped, "state_dict"), (teacher_run.run_dir / "best.pt",
                                                                       "fusionkd checkpoint")):
        net = create_model("resnet20", num_classes=4, in_chans=1)
        report = load_weights_file(net, path, replace_classifier=False)
        assert report.kind == kind and report.replaced_classifier is None
        assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_first_conv_is_summed_for_one_channel_and_spread_for_three(tmp_path):
    rgb = create_model("imagenet_resnet18", num_classes=1000, in_chans=3)
    grey = create_model("imagenet_resnet18", num_classes=10, in_chans=1)
    f = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), f)
    report = load_weights_file(grey, f)
    assert torch.allclose(grey.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    assert "summed" in report.adapted_first_conv and "'fc'" in report.replaced_classifier
    g = tmp_path / "grey.pth"
    torch.save(grey.state_dict(), g)
    back = create_model("imagenet_resnet18", num_classes=10, in_chans=3)
    load_weights_file(back, g)
    assert torch.allclose(back.conv1.weight, grey.conv1.weight.repeat(1, 3, 1, 1) / 3)


def test_weights_that_do_not_fit_are_named_errors(tmp_path, teacher_file):
    with pytest.raises(WeightsError, match=r"do not fit the ResNet: missing stages\.0\.3\.conv1\.weight"):
        load_weights_file(create_model("resnet32", num_classes=4, in_chans=1), teacher_file)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_weights_file(create_model("resnet8x4", num_classes=4, in_chans=1), teacher_file)
    with pytest.raises(ConfigError, match=r"weights: the weights in .* do not fit"):
        fusionkd.train(method="baseline", model="wrn_16_1", weights=str(teacher_file), epochs=1,
                       out_dir=str(tmp_path), name="bad", **TINY)
    assert not (tmp_path / "bad").exists()  # a refused input leaves no run folder
    with pytest.raises(ConfigError, match="does not exist"):
        fusionkd.train(method="baseline", weights=str(tmp_path / "nope.pth"), out_dir=str(tmp_path), **TINY)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"accepted: \.pt, \.pth"):
        fusionkd.train(method="baseline", weights=str(tmp_path / "w.txt"), out_dir=str(tmp_path), **TINY)
    evil = tmp_path / "evil.pth"
    torch.save({"net": create_model("resnet20")}, evil)  # a pickled module, not a state dict
    with pytest.raises(WeightsError, match="weights_only=True refused"):
        load_weights_file(create_model("resnet20"), evil)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_weights_file(create_model("resnet20"), bad_st)


# ----------------------------------------------------------------------------- teacher_model / teacher_weights
@pytest.mark.parametrize("method", ["kd", "fitnet", "at", "mfkd"])
def test_outside_teacher_for_every_offline_method(tmp_path, teacher_file, method):
    r = fusionkd.train(method=method, model="resnet20", teacher_model="resnet20", teacher_weights=str(teacher_file),
                       epochs=2, out_dir=str(tmp_path), name=method, **TINY)
    extras = r.summary["method_extras"]["teacher"]
    assert extras["source"] == "teacher_model" and extras["weights"] == str(teacher_file)
    check = extras["check"]
    assert check["split"] == "validation" and check["images"] == 48
    assert check["accuracy"] > check["threshold"] > check["constant_guess"]
    inside = {k[len("teacher."):]: v for k, v in load_checkpoint(r.run_dir / "last.pt")["method_state"].items()
              if k.startswith("teacher.")}
    file = torch.load(teacher_file, weights_only=True)
    assert inside.keys() == file.keys() and all(torch.equal(inside[k], v) for k, v in file.items())


def test_outside_teacher_resumes_without_its_file_and_through_the_cli(tmp_path, teacher_file):
    copy = tmp_path / "t.pth"
    copy.write_bytes(teacher_file.read_bytes())
    rc = main(["train", "--method", "kd", "--model", "resnet20", "--dataset", "synthetic",
               "dataset_options={num_classes: 4, in_chans: 1, train_size: 192, test_size: 40}", "image_size=16",
               "val_fraction=0.25", "epochs=2", "batch_size=16", "lr=0.05", "threads=1", "progress=none",
               f"out_dir={tmp_path}", "name=kd", f"teacher_weights={copy}", "--teacher-model", "resnet20",
               "--stop-after", "1"])
    assert rc == 0
    copy.unlink()
    r = fusionkd.resume(tmp_path / "kd")
    assert r.summary["finished"] and r.summary["method_extras"]["teacher"]["check"]["accuracy"] > 40


def test_a_teacher_at_chance_stops_the_run(tmp_path, teacher_file):
    state = torch.load(teacher_file, weights_only=True)
    state["head.fc.weight"].zero_()
    state["head.fc.bias"].zero_()  # constant logits: always class 0
    dead = tmp_path / "dead.pth"
    torch.save(state, dead)
    with pytest.raises(ConfigError, match=r"no better than chance .*normalised with this run's mean"):
        fusionkd.train(method="kd", model="resnet20", teacher_model="resnet20", teacher_weights=str(dead),
                       epochs=1, out_dir=str(tmp_path), name="dead", **TINY)
    assert not (tmp_path / "dead").exists()
    with pytest.raises(ConfigError, match="threshold 99.00%: teacher_min_accuracy"):
        fusionkd.train(method="kd", model="resnet20", teacher_model="resnet20", teacher_weights=str(teacher_file),
                       teacher_min_accuracy=99, epochs=1, out_dir=str(tmp_path), name="strict", **TINY)


def test_teacher_key_refusals(tmp_path, teacher_file, teacher_run):
    kw = dict(model="resnet20", epochs=1, out_dir=str(tmp_path), **TINY)
    cases = [
        (dict(method="kd", teacher=str(teacher_run.run_dir / "best.pt"), teacher_model="resnet20",
              teacher_weights=str(teacher_file)), "not both"),
        (dict(method="kd", teacher=str(teacher_run.run_dir / "best.pt"), teacher_weights=str(teacher_file)),
         "goes with teacher_model"),
        (dict(method="kd", teacher_model="resnet20"), "needs teacher_weights"),
        (dict(method="kd", teacher_model="resnet21", teacher_weights=str(teacher_file)), "'resnet20'"),
        (dict(method="baseline", teacher_model="resnet20", teacher_weights=str(teacher_file)),
         "does not use a teacher"),
        (dict(method="kd"), "teacher_model=NAME"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            fusionkd.train(**{**kw, **extra})
    with pytest.raises(ConfigError, match=r"classifier 'head.fc' has shape \(3, 64\) \(3 classes\)"):
        fusionkd.train(method="kd", teacher_model="resnet20", teacher_weights=str(teacher_file), name="k3",
                       **{**kw, "dataset_options": {**DATA, "num_classes": 3}})


def test_compare_passes_the_outside_teacher_to_offline_runs_only(tmp_path, teacher_file):
    common = {k: v for k, v in TINY.items() if k not in ("threads", "progress")}
    spec = CompareSpec(methods=["baseline", "kd", "mfkd"], models=["resnet20"], seeds=[0], out=tmp_path,
                       common={**common, "epochs": 1, "teacher_model": "resnet20",
                               "teacher_weights": str(teacher_file)})
    _, tasks = plan(spec)
    by = {t.method: t.config for t in tasks}
    assert by["baseline"].teacher_model is None and by["baseline"].teacher_weights is None
    for m in ("kd", "mfkd"):
        assert by[m].teacher_model == "resnet20" and by[m].teacher_weights == str(teacher_file.resolve())
    with pytest.raises(ConfigError, match="give one teacher"):
        plan(CompareSpec(methods=["kd"], models=["resnet20"], seeds=[0], out=tmp_path, teacher_model="resnet20",
                         common={"teacher_model": "resnet20", "teacher_weights": str(teacher_file)}))


# ----------------------------------------------------------------------------- user module objects
def test_stage_inference_from_feature_info_and_torchvision_names():
    assert infer_stages(TVStyleResNet()) == (["layer1", "layer2", "layer3", "layer4"], "fc")
    assert infer_stages(TimmStyleNet()) == (["stages.0", "stages.1", "stages.2"], "head")
    net = adapt_module(TimmStyleNet(), in_chans=1, input_size=16)
    assert [(s.channels, s.stride) for s in net.stage_info] == [(16, 4), (24, 8), (32, 16)]
    with pytest.raises(ValueError, match=r"HookBackbone\(module, stage_names"):
        adapt_module(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))


@pytest.mark.parametrize("method", ["frskd", "byot", "fmfsd"])
def test_self_methods_train_on_an_adapted_module(tmp_path, method):
    torch.manual_seed(0)
    module = TVStyleResNet()
    obj = module if method != "fmfsd" else HookBackbone(module, ["layer1", "layer2", "layer3", "layer4"], "fc",
                                                        input_shape=(1, 16, 16))
    r = fusionkd.train(method=method, model=obj, epochs=1, out_dir=str(tmp_path), name=method, **TINY)
    assert r.summary["finished"] and r.summary["deploy_model"] == "user-" + type(obj).__name__.lower()
    deploy = r.load_deploy_model()
    assert isinstance(deploy, HookBackbone)
    assert deploy.module is not module  # the run trained a copy; the user's object is untouched
    assert len(r.summary["heads"]) > 1


def test_mfkd_with_an_adapted_student_and_an_object_teacher(tmp_path, teacher_file):
    teacher = create_model("resnet20", num_classes=4, in_chans=1)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    r = fusionkd.train(method="mfkd", model=TimmStyleNet(), teacher_model=teacher, epochs=2,
                       out_dir=str(tmp_path), name="mfkd", **TINY)
    extras = r.summary["method_extras"]["teacher"]
    assert extras["model"] == "user-resnet" and extras["check"]["accuracy"] > extras["check"]["threshold"]
    assert r.summary["deploy_model"] == "user-timmstylenet"


def test_object_with_another_class_count_gets_a_fresh_classifier_but_a_teacher_does_not(tmp_path):
    r = fusionkd.train(method="baseline", model=TVStyleResNet(num_classes=1000), epochs=1, out_dir=str(tmp_path),
                       name="b", **TINY)
    assert r.load_deploy_model().module.fc.out_features == 4
    with pytest.raises(ConfigError, match="a teacher must predict the run's classes"):
        fusionkd.train(method="kd", model="resnet20", teacher_model=TVStyleResNet(num_classes=10), epochs=1,
                       out_dir=str(tmp_path), name="k", **TINY)


@pytest.mark.parametrize("method", ["ffl_s", "one"])
def test_shared_trunk_methods_refuse_an_adapted_module_saying_why(tmp_path, method):
    with pytest.raises(ValueError, match=r"shared trunk .*\(ffl_s, one\).* Use ffl"):
        fusionkd.train(method=method, model=TVStyleResNet(), epochs=1, out_dir=str(tmp_path), **TINY)


NO_TV_TIMM = r"""
import importlib.abc, json, os, pkgutil, sys, tempfile, traceback

attempts = []


class Blocker(importlib.abc.MetaPathFinder):
    # first on sys.meta_path: sees every import (and importlib.util.find_spec probe) of torchvision/timm, even
    # one inside a try/except ImportError, records where it came from and makes it fail as if not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "timm"):
            frame = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")][-1]
            attempts.append([name, frame.filename, frame.lineno])
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[1])
import torch

import fusionkd
for info in pkgutil.walk_packages(fusionkd.__path__, "fusionkd."):  # every module of the package
    if not info.name.endswith("__main__"):
        __import__(info.name)
from fusionkd.cli import main
from fusionkd.models import HookBackbone, adapt_module, create_model, infer_stages, list_models
from test_outside_models import TINY, TimmStyleNet, TVStyleResNet

for name in list_models():
    create_model(name, num_classes=4, in_chans=3)
for module in (TVStyleResNet(), TimmStyleNet()):
    stages, head = infer_stages(module)
    assert isinstance(adapt_module(module, in_chans=1, input_size=16), HookBackbone) and len(stages) >= 3
out = tempfile.mkdtemp()
r = fusionkd.train(method="kd", model=TimmStyleNet(), teacher_model=TVStyleResNet(), teacher_min_accuracy=0,
                   epochs=1, out_dir=out, name="kd", **TINY)  # an untrained teacher: only the code paths matter
fusionkd.api.evaluate_checkpoint(r.run_dir / "best.pt")
assert main(["list"]) == 0
print("ATTEMPTS " + json.dumps(attempts))
"""


@pytest.mark.slow
def test_nothing_imports_torchvision_or_timm():
    """Every module of fusionkd, every zoo model, adapting torchvision- and timm-shaped objects, a kd run with an
    outside teacher: no import of torchvision or timm is even attempted (an import hook records and blocks
    them, so the test holds whether or not they are installed)."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent / "src")}
    r = subprocess.run([sys.executable, "-c", NO_TV_TIMM, str(here)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("ATTEMPTS ")]
    assert line, r.stdout[-3000:]
    assert json.loads(line[-1][len("ATTEMPTS "):]) == []


# ----------------------------------------------------------------------------- presets
def test_presets_are_listed_and_resolve_with_overrides(capsys, tmp_path):
    from fusionkd.engine.config import resolve_config
    from fusionkd.presets import list_presets

    names = {p["name"]: p for p in list_presets()}
    assert set(names) == {"frskd-tinyimagenet", "frskd-finegrained", "frskd-imagenet", "ffl-imagenet",
                          "cifar100-offline", "cifar100-offline-mobile", "ffl-cifar100", "frskd-cifar100",
                          "mfkd-cifar100", "fmfsd-cifar100", "mfef-cifar100"}
    assert all(p["description"] and p["source"] for p in names.values())
    cfg = resolve_config({"epochs": 10, "milestones": None}, config_file="frskd-imagenet")  # default 50 %/75 %
    assert (cfg.method, cfg.model, cfg.batch_size, cfg.image_size) == ("frskd", "imagenet_resnet18", 256, 224)
    assert cfg.options == {"alpha": 1.0, "beta": 200.0} and cfg.epochs == 10 and cfg.milestones is None
    fine = resolve_config(config_file="frskd-finegrained")
    assert (fine.batch_size, fine.epochs, fine.milestones) == (32, 200, [100, 150])
    assert resolve_config(config_file="ffl-imagenet").milestones == [30, 60]
    # the official-layout readers (read through the store, ImageNet-style random-resized crop at 224 px)
    assert [resolve_config(config_file=n).dataset for n in ("frskd-tinyimagenet", "frskd-finegrained",
                                                           "frskd-imagenet", "ffl-imagenet")] == \
        ["tinyimagenet", "cub200", "imagenet", "imagenet"]
    # the CIFAR-100 recipes: RepDistiller's offline protocol (lr 0.01 for MobileNetV2 students) and each seed method's
    offline = resolve_config({"model": "resnet20"}, config_file="cifar100-offline")
    assert (offline.epochs, offline.batch_size, offline.lr, offline.weight_decay, offline.milestones,
            offline.val_fraction) == (240, 64, 0.05, 5e-4, [150, 180, 210], 0.0)
    assert resolve_config(config_file="cifar100-offline-mobile").lr == 0.01
    assert [(c.method, c.epochs, c.milestones) for c in (resolve_config(config_file=n) for n in (
        "ffl-cifar100", "frskd-cifar100", "fmfsd-cifar100", "mfef-cifar100"))] == [
        ("ffl_s", 300, [150, 225]), ("frskd", 200, [100, 150]), ("fmfsd", 200, [66, 133, 190]),
        ("mfef", 300, [150, 225])]
    (tmp_path / "t.pth").write_bytes(b"")  # resolving only checks that the teacher file is there
    mfkd = resolve_config({"teacher_model": "resnet56", "teacher_weights": str(tmp_path / "t.pth")},
                          config_file="mfkd-cifar100")
    assert (mfkd.method, mfkd.model, mfkd.epochs) == ("mfkd", "resnet20", 240)
    with pytest.raises(ConfigError, match="nor is it a preset name: cifar100-offline-mobile, .*, frskd-imagenet, "):
        resolve_config(config_file="frskd-imagenett")
    assert main(["list"]) == 0
    assert "frskd-finegrained" in capsys.readouterr().out


def test_weights_file_into_an_adapted_module_and_rebuilding_a_user_run(tmp_path):
    torch.manual_seed(0)
    source = TVStyleResNet(num_classes=10)
    path = tmp_path / "tv.pth"
    torch.save(source.state_dict(), path)  # the module's own keys: conv1.weight ... fc.bias
    net = HookBackbone(TVStyleResNet(num_classes=4), ["layer1", "layer2", "layer3", "layer4"], "fc",
                       input_shape=(1, 16, 16))
    report = load_weights_file(net, path)
    assert "'fc' replaced" in report.replaced_classifier
    assert torch.equal(net.module.layer3[0].weight, source.layer3[0].weight)
    from fusionkd.models import MODELS, register_module

    name = register_module(TVStyleResNet(), name="user-rebuild-test")
    r = fusionkd.train(method="baseline", model=name, epochs=1, out_dir=str(tmp_path), name="u", **TINY)
    del MODELS._entries[name]  # as in a new Python process
    with pytest.raises(Exception, match=r"register it again .*register_module\(module, name='user-rebuild-test'\)"):
        r.load_deploy_model()
    with pytest.raises(ConfigError, match="register it again in this process"):
        fusionkd.resume(r.run_dir, epochs=2)
    register_module(TVStyleResNet(), name=name)
    assert isinstance(r.load_deploy_model(), HookBackbone)
    assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2


@pytest.mark.slow
def test_outside_teacher_run_evaluates_and_an_imagenet_student_exports(tmp_path, teacher_file):
    r = fusionkd.train(method="kd", model="imagenet_resnet18", teacher_model="resnet20",
                       teacher_weights=str(teacher_file), epochs=1, out_dir=str(tmp_path), name="kd",
                       **TINY)  # 16 px: the teacher's size (at 32 px the synthetic images differ and it is refused)
    ev = fusionkd.api.evaluate_checkpoint(r.run_dir / "best.pt")
    assert ev["accuracy"]["net"] == pytest.approx(r.summary["best"]["test"]["net"])
    out = fusionkd.api.export_checkpoint(r.run_dir / "best.pt", tmp_path / "student.pt2", onnx=False)
    assert out["max_abs_diff"] < 1e-4
    exported = torch.load(out["deploy"], weights_only=True)["deploy"]["state_dict"]
    assert list(exported)[:2] == ["conv1.weight", "bn1.weight"] and "fc.weight" in exported  # torchvision keys


def test_imagenet_normalisation_is_recorded_and_used_by_evaluation(tmp_path, teacher_run):
    r = fusionkd.train(method="baseline", model="resnet20", normalize="imagenet", epochs=1, out_dir=str(tmp_path),
                       name="n", **TINY)
    data = load_checkpoint(r.run_dir / "best.pt")["data"]
    assert data["mean"] == [0.449] and data["std"] == [0.226]  # grey data: the channel means (timm's)
    ev = fusionkd.api.evaluate_checkpoint(r.run_dir / "best.pt")
    assert ev["accuracy"]["net"] == pytest.approx(r.summary["best"]["test"]["net"])
    with pytest.raises(ConfigError, match="normalisation mean/std"):  # a teacher normalised otherwise
        fusionkd.train(method="kd", model="resnet20", normalize="imagenet", teacher=str(teacher_run.run_dir),
                       epochs=1, out_dir=str(tmp_path), name="k", **TINY)
    with pytest.raises(ConfigError, match="choose one of: data, imagenet"):
        fusionkd.train(method="baseline", normalize="cifar", out_dir=str(tmp_path), **TINY)


def test_hookbackbone_sees_a_head_that_differs_even_behind_a_final_in_place_op():
    """A final ``relu_`` after the last stage rewrites the captured map within one forward; the dry run checks on
    two forwards, so ``keeps_contract`` is False (and a warning says so), as it is for the plain case."""
    import torch.nn.functional as F

    class InPlaceTail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stage = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.stage(x), inplace=True), 1), 1))

    with pytest.warns(UserWarning, match="differs from the forward"):
        net = HookBackbone(InPlaceTail(), ["stage"], "fc", input_shape=(1, 8, 8))
    assert net.keeps_contract is False
    plain = HookBackbone(TVStyleResNet(num_classes=3), ["layer1", "layer2", "layer3", "layer4"], "fc",
                         input_shape=(1, 16, 16))
    assert plain.keeps_contract is True
