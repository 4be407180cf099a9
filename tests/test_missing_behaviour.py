"""Behaviour that was only refused or never checked before: baseline's loss and gradient by hand, the predict CLI
on real PNG files, the TensorBoard writer, and what grad_clip, eval_every, optimizer=adamw, lr_scale=linear and
sync_bn actually do. All on tiny synthetic runs (seconds each)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from handmath import log_softmax
from torch import nn

import fusionkd
from fusionkd.cli import main
from fusionkd.engine import distributed as D
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.engine.optim import build_optimizer
from fusionkd.methods import METHODS, MethodContext

DATA = {"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 32}
TINY = dict(method="baseline", model="resnet20", dataset="synthetic", dataset_options=DATA, image_size=16,
            val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=2, lr=0.05, schedule="constant",
            progress="none", threads=1)


def tiny(tmp_path: Path, name: str, **kw) -> dict:
    return {**TINY, "out_dir": str(tmp_path / "runs"), "name": name, **kw}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- baseline
def test_baseline_loss_and_gradient_by_hand():
    """loss_ce = mean_i -log softmax(z_i)[y_i] with z = W f + b; dL/dW = mean_i (p_i - onehot(y_i)) f_i^T,
    dL/db = mean_i (p_i - onehot(y_i)); f = the pooled features entering the classifier."""
    torch.manual_seed(0)
    m = METHODS.get("baseline")(MethodContext(model="resnet20", num_classes=4, in_chans=1, image_size=16, epochs=1))
    m.train()
    fc = m.net.head.fc
    seen = {}
    fc.register_forward_hook(lambda mod, inp, out: seen.update(f=inp[0].detach().double().tolist()))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 1, 16, 16, generator=g), torch.tensor([0, 3, 1, 1, 2])
    terms = m.training_step(x, y, 0)
    assert set(terms) == {"loss_ce"}
    feats, labels = seen["f"], y.tolist()
    w, b = fc.weight.detach().double().tolist(), fc.bias.detach().double().tolist()
    z = [[sum(wk[j] * f[j] for j in range(len(f))) + bk for wk, bk in zip(w, b)] for f in feats]
    loss = sum(-log_softmax(zi)[yi] for zi, yi in zip(z, labels)) / len(z)
    assert float(terms["loss_ce"].detach()) == pytest.approx(loss, rel=1e-5)
    m.zero_grad(set_to_none=True)
    terms["loss_ce"].backward()
    n = len(z)
    delta = [[np.exp(v) - (k == yi) for k, v in enumerate(log_softmax(zi))] for zi, yi in zip(z, labels)]
    grad_w = [[sum(delta[i][k] * feats[i][j] for i in range(n)) / n for j in range(len(feats[0]))] for k in range(4)]
    grad_b = [sum(delta[i][k] for i in range(n)) / n for k in range(4)]
    assert np.allclose(fc.weight.grad.double().numpy(), grad_w, atol=1e-6)
    assert np.allclose(fc.bias.grad.double().numpy(), grad_b, atol=1e-6)
    assert m.net.stem[0].weight.grad.abs().sum() > 0  # and the whole network below it trains


# ---------------------------------------------------------------------- predict CLI
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return fusionkd.train(**tiny(tmp_path_factory.mktemp("run"), "p"))


def test_predict_cli_on_real_pngs(finished, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(5)
    grey = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, arr in enumerate(grey):
        paths.append(tmp_path / f"photo {i}.png")  # a space in the name: the path is printed as given
        Image.fromarray(arr, mode="L").save(paths[-1])
    ckpt = finished.run_dir / "best.pt"
    assert main(["predict", str(ckpt), *map(str, paths), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    data = load_checkpoint(ckpt)["data"]
    x = (torch.from_numpy(np.stack(grey)).float().div(255).unsqueeze(1) - data["mean"][0]) / data["std"][0]
    with torch.no_grad():
        probs = finished.load_deploy_model().eval()(x).softmax(1)
    assert len(lines) == 3
    for line, path, p in zip(lines, paths, probs):
        m = re.fullmatch(r"(.+): (class_\d) (\d+\.\d)%, (class_\d) (\d+\.\d)%", line)
        assert m, line
        assert m.group(1) == str(path)
        order = p.argsort(descending=True)[:2].tolist()
        assert [m.group(2), m.group(4)] == [data["classes"][i] for i in order]
        assert [float(m.group(3)), float(m.group(5))] == pytest.approx([100 * float(p[i]) for i in order], abs=0.051)
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["predict", str(ckpt), str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "notes.png" in err and "Traceback" not in err


# ---------------------------------------------------------------------- TensorBoard
class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not installed here)."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.events = log_dir, [], []
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.events.append(("flush", len(self.scalars)))

    def close(self):
        self.events.append(("close", len(self.scalars)))


def test_tensorboard_writer_gets_every_scalar_of_every_epoch(tmp_path, monkeypatch):
    import importlib.util

    from fusionkd.engine.trackers import tensorboard as tb

    if importlib.util.find_spec("tensorboard") is None:
        # without the package: refused before any work, saying what to install
        with pytest.raises(ConfigError, match="needs the tensorboard package: pip install tensorboard"):
            fusionkd.train(**tiny(tmp_path, "refused", tracker="tensorboard"))
        assert not (tmp_path / "runs" / "refused").exists()
        monkeypatch.setattr(tb, "check", lambda cfg: None)
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.made.clear()
    r = fusionkd.train(**tiny(tmp_path, "tb", epochs=3, tracker="tensorboard"))
    assert len(FakeWriter.made) == 1
    w = FakeWriter.made[0]
    assert Path(w.log_dir) == r.run_dir / "tb"
    lines = metrics(r.run_dir)
    want = []
    for m in lines:  # the metrics.jsonl record of each epoch, as flat names, step = the epoch
        flat = {f"train/{k}": v for k, v in m["train"].items()}
        flat.update({f"{split}/{h}": v for split in ("val", "test") for h, v in (m.get(split) or {}).items()})
        flat.update({k: m[k] for k in ("lr", "img_per_s", "time_train_s", "time_eval_s") if k in m})
        want += [(k, pytest.approx(v), m["epoch"]) for k, v in flat.items()]
    assert sorted(w.scalars, key=lambda s: (s[2], s[0])) == sorted(want, key=lambda s: (s[2], s[0]))
    assert {"train/loss", "train/loss_ce", "val/net", "lr"} <= {t for t, _, s in w.scalars if s == 1}
    assert ("test/net", pytest.approx(lines[-1]["test"]["net"]), 3) in w.scalars
    per_epoch = [sum(1 for s in w.scalars if s[2] <= e) for e in (1, 2, 3)]
    assert w.events == [("flush", per_epoch[0]), ("flush", per_epoch[1]), ("flush", per_epoch[2]),
                        ("close", per_epoch[2])]  # flushed after each epoch, closed once at the end


# ---------------------------------------------------------------------- grad_clip
def _step_grad_norms(monkeypatch) -> list[float]:
    """The global gradient norm each SGD step really uses (after any clipping)."""
    norms: list[float] = []
    real = torch.optim.SGD.step

    def step(self, *a, **kw):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return norms


def test_grad_clip_limits_the_norm_of_every_step(tmp_path, monkeypatch):
    free = _step_grad_norms(monkeypatch)
    a = fusionkd.train(**tiny(tmp_path, "free"))
    assert len(free) == 6 and min(free) > 0.05  # 3 steps x 2 epochs, all above the limit below
    monkeypatch.undo()
    clipped = _step_grad_norms(monkeypatch)
    b = fusionkd.train(**tiny(tmp_path, "clipped", grad_clip=0.05))
    assert len(clipped) == 6 and clipped == pytest.approx([0.05] * 6, rel=1e-4)  # clipped to exactly the limit
    wa, wb = (load_checkpoint(r.run_dir / "last.pt")["method_state"] for r in (a, b))
    assert not torch.allclose(wa["net.head.fc.weight"], wb["net.head.fc.weight"])


# ---------------------------------------------------------------------- eval_every
def test_eval_every_evaluates_every_nth_epoch_and_the_last(tmp_path):
    r = fusionkd.train(**tiny(tmp_path, "ev", epochs=5, eval_every=2))
    lines = metrics(r.run_dir)
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4, 5]
    assert [m["epoch"] for m in lines if "val" in m] == [2, 4, 5]  # every 2nd epoch, and always the last
    assert [m["epoch"] for m in lines if "test" in m] == [5]
    assert all("loss_ce" in m["train"] for m in lines)  # every epoch still trains and logs
    best = r.summary["best"]
    assert best["epoch"] in (2, 4, 5) and load_checkpoint(r.run_dir / "best.pt")["epoch"] == best["epoch"]
    evaluated = {m["epoch"]: m["val"]["net"] for m in lines if "val" in m}
    assert best["val"]["net"] == max(evaluated.values())


# ---------------------------------------------------------------------- adamw
def test_adamw_is_decoupled_per_parameter_group():
    ctx = MethodContext(model="resnet20", num_classes=4, in_chans=1, image_size=16, epochs=10)
    torch.manual_seed(0)
    method = METHODS.get("ffl")(ctx)
    # nesterov=False: ffl's recipe sets nesterov=true, which is refused with adamw (reported with issue #25)
    cfg = resolve_config({"method": "ffl", "optimizer": "adamw", "nesterov": False, "weight_decay": 0.05})
    opt = build_optimizer(method.param_groups(cfg.weight_decay), cfg, lr=0.1)
    assert type(opt) is torch.optim.AdamW
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["networks"]["weight_decay"] == 0.05 and groups["fusion"]["weight_decay"] == 1e-5
    assert {id(p) for p in groups["fusion"]["params"]} == {id(p) for p in method.fusion.parameters()}
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    # with a zero gradient, decoupled decay is exactly p <- p (1 - lr wd) (an L2 penalty in the gradient,
    # Adam's coupled decay, would move every weight by about lr instead)
    for g in opt.param_groups:
        for p in g["params"]:
            assert torch.allclose(p.detach(), before[id(p)] * (1 - 0.1 * g["weight_decay"]), rtol=1e-6, atol=1e-9)


def test_adamw_through_the_trainer(tmp_path):
    r = fusionkd.train(**tiny(tmp_path, "adamw", optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=1))
    state = load_checkpoint(r.run_dir / "last.pt")["optimizer"]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.05]
    assert state["param_groups"][0]["decoupled_weight_decay"] is True
    assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in state["state"].values())


# ---------------------------------------------------------------------- lr_scale and sync_bn under a world size
@pytest.fixture
def world_of_two(monkeypatch):
    """The trainer as rank 0 of 2 (DistInfo(0, 2)) in this one process: a real one-member gloo group stands in
    for the other rank, so every collective works; the loaders shard as rank 0 of 2."""
    import torch.distributed as dist

    def setup(device_name):
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return D.DistInfo(0, 2, 0), torch.device("cpu")

    monkeypatch.setattr(D, "setup", setup)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("scale, factor", [("linear", 2), ("none", 1)])
def test_lr_scale_linear_multiplies_the_lr_by_the_world_size(tmp_path, world_of_two, scale, factor):
    r = fusionkd.train(**tiny(tmp_path, scale, lr=0.05, lr_scale=scale, epochs=1))
    assert [m["lr"] for m in metrics(r.run_dir)] == pytest.approx([0.05 * factor])
    opt = load_checkpoint(r.run_dir / "last.pt")["optimizer"]
    assert opt["param_groups"][0]["initial_lr"] == pytest.approx(0.05 * factor)
    assert r.summary["data"]["train"] == 48  # the whole split, of which this rank trained on its half


def test_sync_bn_converts_only_under_distributed(tmp_path, world_of_two):
    with pytest.raises(ConfigError, match="sync_bn=true needs CUDA devices"):  # a world of 2 on CPU: refused
        fusionkd.train(**tiny(tmp_path, "sync", sync_bn=True, epochs=1))


def test_sync_bn_is_a_no_op_in_one_process_and_the_conversion(tmp_path):
    from fusionkd.engine.trainer import Trainer

    t = Trainer(resolve_config(tiny(tmp_path, "one", sync_bn=True, epochs=1)))
    t.fit()  # one process: nothing to synchronise, plain BatchNorm
    kinds = {type(mod) for mod in t.method.modules()}
    assert nn.BatchNorm2d in kinds and nn.SyncBatchNorm not in kinds
    # the conversion itself (what a CUDA world runs): every BatchNorm, 2d and 1d, becomes a SyncBatchNorm with
    # the same affine weights and running statistics
    torch.manual_seed(0)
    one = METHODS.get("one")(MethodContext(model="resnet20", num_classes=4, in_chans=1, image_size=16, epochs=2))
    one.train()
    one(torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), 0)  # non-trivial running statistics
    bns = {n: mod for n, mod in one.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    ref = {n: {k: v.clone() for k, v in mod.state_dict().items()} for n, mod in bns.items()}
    assert any(isinstance(mod, nn.BatchNorm1d) for mod in bns.values())  # ONE's gate
    conv = D.convert_sync_batchnorm(one, torch.device("cuda"))
    got = dict(conv.named_modules())
    for n in bns:
        assert type(got[n]) is nn.SyncBatchNorm, n
        assert all(torch.equal(got[n].state_dict()[k], v) for k, v in ref[n].items()), n
    assert not any(type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d) for mod in conv.modules())
