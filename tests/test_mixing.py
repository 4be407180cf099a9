"""MixUp, CutMix and RandAugment: mixed images and soft targets by hand, the CE identity every method relies
on, draws that depend on (seed, epoch) only, and a bit-exact resume of a run that uses all three."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusionkd
from fusionkd.data import DeviceLoader, load_dataset
from fusionkd.data.mixing import RANDAUGMENT_OPS, apply_op, draw_mixing, mix_batch
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.methods import METHODS


def test_mix_batch_by_hand():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    y = torch.tensor([0, 2])
    perm = torch.tensor([1, 0])
    xm, t = mix_batch(x, y, 3, 1, 0.25, perm, (0, 0, 0, 0))  # MixUp
    assert torch.allclose(xm[0], 0.25 * x[0] + 0.75 * x[1]) and torch.allclose(t[0], torch.tensor([0.25, 0, 0.75]))
    xc, tc = mix_batch(x, y, 3, 2, 0.75, perm, (0, 2, 0, 2))  # CutMix: a 2x2 box of 16 pixels pasted
    assert torch.equal(xc[0, :, :2, :2], x[1, :, :2, :2]) and torch.equal(xc[0, :, 2:, :], x[0, :, 2:, :])
    assert torch.allclose(tc[1], torch.tensor([0.25, 0, 0.75]))
    _, one_hot = mix_batch(x, y, 3, 0, 1.0, perm, (0, 0, 0, 0))
    assert torch.equal(one_hot, F.one_hot(y, 3).float())
    # the identity every method's CE terms rely on: CE(z, lam e_a + (1 - lam) e_b) = lam CE_a + (1 - lam) CE_b
    z = torch.randn(2, 3)
    assert torch.allclose(F.cross_entropy(z, t), 0.25 * F.cross_entropy(z, y) + 0.75 * F.cross_entropy(z, y[perm]))


def test_cutmix_lambda_is_the_clipped_box_area():
    d = draw_mixing(200, 8, 10, 12, mixup=0.0, cutmix=1.0, prob=1.0, seed=3)
    y0, y1, x0, x1 = d.box.T
    assert torch.all(d.mode == 2) and torch.all((y0 >= 0) & (y1 <= 10) & (x0 >= 0) & (x1 <= 12))
    assert torch.allclose(d.lam, 1 - ((y1 - y0) * (x1 - x0)).double() / 120)
    both = draw_mixing(400, 8, 10, 10, mixup=0.2, cutmix=1.0, prob=0.5, seed=4)
    counts = torch.bincount(both.mode.long(), minlength=3)
    assert 150 < counts[0] < 250 and counts[1] > 50 and counts[2] > 50  # half unmixed, the rest split
    assert torch.equal(draw_mixing(5, 8, 10, 10, mixup=0.2, cutmix=0, prob=1, seed=9).lam,
                       draw_mixing(5, 8, 10, 10, mixup=0.2, cutmix=0, prob=1, seed=9).lam)


def test_randaugment_ops_keep_range_and_shape():
    x = torch.randint(0, 256, (6, 3, 16, 16)).float()
    level = torch.linspace(-1, 1, 6)
    for name in RANDAUGMENT_OPS:
        y = apply_op(name, x, level)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255, name
    assert torch.equal(apply_op("translate_x", x, torch.zeros(6)), x)  # level 0 is the identity
    assert torch.equal(apply_op("solarize", x, torch.zeros(6)), x)
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op("equalize", x, level)


def test_loader_draws_depend_on_seed_and_epoch_only():
    splits = load_dataset("synthetic", val_fraction=0, num_classes=4, in_chans=1, train_size=64, test_size=8,
                          image_size=16)
    kw = dict(batch_size=16, train=True, mixup=0.4, cutmix=1.0, randaugment=2, num_classes=4, seed=5)
    a, b = DeviceLoader(splits.train, splits.info, **kw), DeviceLoader(splits.train, splits.info, **kw)
    a.set_epoch(3)
    b.set_epoch(2)
    list(b)  # b has served another epoch first: epoch 3 must still be the same batches
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert ya.shape == (16, 4) and torch.allclose(ya.sum(1), torch.ones(16))
    with pytest.raises(ValueError, match="num_classes"):
        DeviceLoader(splits.train, splits.info, batch_size=16, train=True, mixup=0.2)
    with pytest.raises(ConfigError, match=r"augment.mix_prob=1.5 is out of range"):
        resolve_config({"augment": {"mix_prob": 1.5}})


RUN = dict(model="wrn_16_1", dataset="synthetic",
           dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 16}, image_size=16,
           val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=3, progress="none", threads=1,
           augment={"mixup": 0.4, "cutmix": 1.0, "mix_prob": 0.8, "randaugment": 2, "cutout": 4})


def test_mixup_cutmix_randaugment_resume_bit_exact(tmp_path):
    straight = fusionkd.train(method="baseline", out_dir=str(tmp_path), name="a", **RUN)
    part = fusionkd.train(method="baseline", out_dir=str(tmp_path), name="b", stop_after=1, **RUN)
    assert not part.summary["finished"]
    resumed = fusionkd.resume(tmp_path / "b")
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["method_state"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["method_state"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert straight.summary["last"] == resumed.summary["last"]


@pytest.mark.parametrize("method", [m for m in METHODS.names() if not METHODS.get(m).needs_teacher])
def test_every_online_and_self_method_trains_on_soft_targets(tmp_path, method):
    r = fusionkd.train(method=method, out_dir=str(tmp_path), name=method, **{**RUN, "epochs": 1})
    assert r.summary["finished"]


def test_every_offline_method_trains_on_soft_targets(tmp_path):
    teacher = fusionkd.train(method="baseline", out_dir=str(tmp_path), name="t", **{**RUN, "epochs": 1})
    # a method with a per-sample state (needs_indices: crd) refuses MixUp/CutMix, tests/test_crd.py
    for method in [m for m in METHODS.names() if METHODS.get(m).needs_teacher and not METHODS.get(m).needs_indices]:
        r = fusionkd.train(method=method, teacher=str(teacher.run_dir / "best.pt"), out_dir=str(tmp_path),
                           name=method, teacher_min_accuracy=0,  # a 1-epoch teacher: mechanics, not teaching
                           **{**RUN, "epochs": 2 if method == "mfkd" else 1})  # mfkd: fusion stage
        assert r.summary["finished"], method
