"""``crd`` (Tian, Krishnan, Isola, ICLR 2020): the NCE loss by hand, against RepDistiller's ContrastMemory /
ContrastLoss re-written here, what trains and what the bank does, the negative draw, the engine end to end
with exact resume, and every refusal (options, MixUp, a bank too large, torchrun)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_offline_engine import TINY, assert_option_refused, two_step_cli

import fusionkd
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError
from fusionkd.methods import METHODS, MethodContext, Teacher
from fusionkd.methods import crd as crd_module
from fusionkd.methods.crd import (
    CRD,
    ContrastMemory,
    CRDOptions,
    bank_bytes,
    check_bank_fits,
    contrast_scores,
    draw_contrast_indices,
    nce_loss,
    negative_tables,
)
from fusionkd.models import create_model

EPS = 1e-7


def build(n: int = 40, classes: int = 4, **options) -> CRD:
    torch.manual_seed(0)
    t = create_model("resnet8", num_classes=classes, in_chans=1)
    with torch.no_grad():
        t.train()
        t(torch.randn(8, 1, 16, 16))
    t.eval()
    ctx = MethodContext(model="resnet8", num_classes=classes, in_chans=1, image_size=16, epochs=2,
                        teacher=Teacher(t, "resnet8", {}), train_labels=torch.arange(n) % classes)
    return CRD(ctx, CRDOptions(**{"nce_k": 8, **options}))


# ----------------------------------------------------------------------------- the loss by hand
def test_nce_loss_by_hand():
    # N = 4 samples, D = 2, K = 2 negatives, B = 1 anchor; both banks and embeddings fixed
    n, k, tau = 4, 2, 0.5
    mem_s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    mem_t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, -0.6], [0.0, -1.0]])
    v_s, v_t = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    cidx = torch.tensor([[2, 0, 3]])

    def side(mem, v):  # exp(<mem[j], v> / tau) / Z with Z = mean * N over this batch (the first one)
        out = [math.exp((mem[j][0] * v[0] + mem[j][1] * v[1]) / tau) for j in (2, 0, 3)]
        z = sum(out) / len(out) * n
        p = [o / z for o in out]
        m_pn = k / n
        return -(math.log(p[0] / (p[0] + m_pn + EPS)) + sum(math.log(m_pn / (q + m_pn + EPS)) for q in p[1:]))

    expected = side(mem_t.tolist(), v_s[0].tolist()) + side(mem_s.tolist(), v_t[0].tolist())
    bank = ContrastMemory(torch.tensor([0, 1, 0, 1]), 2, 2, k, tau, 0.5)
    bank.memory_s.copy_(mem_s)
    bank.memory_t.copy_(mem_t)
    p_s, p_t = bank(v_s, v_t, cidx)
    ours = nce_loss(p_s, n) + nce_loss(p_t, n)
    assert abs(ours.item() - expected) < 1e-5


# ----------------------------------------------------------------------------- RepDistiller, re-written
class RefMemory:
    """RepDistiller ``crd/memory.py`` ``ContrastMemory.forward`` (given contrast indices), literally."""

    def __init__(self, mem_v1, mem_v2, k, t, momentum):
        self.memory_v1, self.memory_v2 = mem_v1.clone(), mem_v2.clone()
        self.params = torch.tensor([k, t, -1, -1, momentum])

    def forward(self, v1, v2, y, idx):
        k, t = int(self.params[0].item()), self.params[1].item()
        z_v1, z_v2, momentum = self.params[2].item(), self.params[3].item(), self.params[4].item()
        bsz, out_size, in_size = v1.size(0), self.memory_v1.size(0), self.memory_v1.size(1)
        w1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(bsz, k + 1, in_size)
        out_v2 = torch.exp(torch.div(torch.bmm(w1, v2.view(bsz, in_size, 1)), t))
        w2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(bsz, k + 1, in_size)
        out_v1 = torch.exp(torch.div(torch.bmm(w2, v1.view(bsz, in_size, 1)), t))
        if z_v1 < 0:
            self.params[2] = out_v1.mean() * out_size
            z_v1 = self.params[2].clone().detach().item()
        if z_v2 < 0:
            self.params[3] = out_v2.mean() * out_size
            z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, z_v1).contiguous()
        out_v2 = torch.div(out_v2, z_v2).contiguous()
        with torch.no_grad():
            for mem, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(mem, 0, y.view(-1)).mul_(momentum).add_(torch.mul(v, 1 - momentum))
                mem.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def ref_contrast_loss(x, n_data):
    """RepDistiller ``crd/criterion.py`` ``ContrastLoss.forward``."""
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + EPS)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + EPS)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


@pytest.mark.parametrize("k", [5, 15])  # 5: the gathered-rows path; 15: the M @ v path (contrast_scores)
def test_matches_repdistiller(k):
    n, d, b = 20, 8, 4
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(n) % 4
    bank = ContrastMemory(labels, 4, d, k, 0.07, 0.5)
    ref = RefMemory(bank.memory_s, bank.memory_t, k, 0.07, 0.5)
    for _ in range(2):  # the second step uses the Z fixed by the first and the updated rows
        v_s = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
        v_t = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
        idx = torch.randperm(n, generator=g)[:b]
        cidx = torch.cat([idx[:, None], torch.randint(0, n, (b, k), generator=g)], 1)
        out_v1, out_v2 = ref.forward(v_s, v_t, idx, cidx)
        expected = ref_contrast_loss(out_v1.squeeze(2), n) + ref_contrast_loss(out_v2.squeeze(2), n)
        p_s, p_t = bank(v_s, v_t, cidx)
        ours = nce_loss(p_s, n) + nce_loss(p_t, n)
        torch.testing.assert_close(ours, expected.squeeze(), rtol=1e-5, atol=1e-5)
        (g_ours,) = torch.autograd.grad(ours, v_s)
        (g_ref,) = torch.autograd.grad(expected.squeeze(), v_s)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
        bank.update(idx, v_s, v_t)
        torch.testing.assert_close(bank.memory_s, ref.memory_v1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bank.memory_t, ref.memory_v2, rtol=1e-6, atol=1e-6)
        assert bank.z_s.item() == pytest.approx(ref.params[2].item(), rel=1e-5)
        assert bank.z_t.item() == pytest.approx(ref.params[3].item(), rel=1e-5)


def test_both_score_paths_agree():
    g = torch.Generator().manual_seed(0)
    mem, v = torch.randn(50, 4, generator=g), torch.randn(3, 4, generator=g)
    cidx = torch.randint(0, 50, (3, 7), generator=g)
    full = contrast_scores(mem, v, cidx)  # 50 * (4 + 3) = 350 >= 3 * 7 * 4 = 84: gathered rows
    rows = torch.stack([torch.stack([mem[j] @ v[b] for j in cidx[b]]) for b in range(3)])
    torch.testing.assert_close(full, rows)
    cidx = torch.randint(0, 50, (3, 40), generator=g)  # 350 < 3 * 40 * 4 = 480: M @ v
    rows = torch.stack([torch.stack([mem[j] @ v[b] for j in cidx[b]]) for b in range(3)])
    torch.testing.assert_close(contrast_scores(mem, v, cidx), rows)


# ----------------------------------------------------------------------------- what trains
def test_what_trains_and_what_the_bank_does():
    m = build()
    m.train()
    assert not m.teacher.training and m.net.training
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith("bank.") for n in names)
    assert {"bank.memory_s", "bank.memory_t", "bank.z_s", "bank.z_t"} <= set(m.state_dict())
    assert "bank.order" not in m.state_dict()  # the class tables come from the labels, not the checkpoint
    before_s, before_t = m.bank.memory_s.clone(), m.bank.memory_t.clone()
    g = torch.Generator().manual_seed(1)
    x, idx = torch.randn(6, 1, 16, 16, generator=g), torch.tensor([3, 8, 13, 22, 31, 36])
    y = idx % 4
    terms = m(x, y, 0, idx)  # Method.forward, as the engine (and DDP) calls it
    assert set(terms) == {"loss_ce", "loss_crd"}  # kd_weight = 0 by default
    sum(terms.values()).backward()
    for part in (m.net, m.embed_s, m.embed_t):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in m.teacher.parameters()) and not m.teacher.training
    changed = (m.bank.memory_s != before_s).any(1) | (m.bank.memory_t != before_t).any(1)
    assert sorted(changed.nonzero().flatten().tolist()) == sorted(idx.tolist())
    torch.testing.assert_close(m.bank.memory_s[idx].norm(dim=1), torch.ones(6))
    z = (m.bank.z_s.item(), m.bank.z_t.item())
    assert z[0] > 0 and z[1] > 0
    m(x, y, 0, idx)
    assert (m.bank.z_s.item(), m.bank.z_t.item()) == z  # fixed by the first batch


def test_training_step_needs_indices_and_hard_labels():
    m = build()
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="dataset index"):
        m.training_step(x, torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="soft targets"):
        m.training_step(x, torch.eye(4)[:2], 0, indices=torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- the negatives
def test_negative_draw():
    labels = torch.tensor([2] * 7 + [0] * 3 + [1] * 12 + [3] * 5 + [4] * 1)  # unequal, unsorted classes
    n = labels.shape[0]
    order, start, count = negative_tables(labels, 5)
    idx = torch.tensor([0, 7, 10, 22, 27])  # one anchor of each class, the first and last blocks included
    torch.manual_seed(0)
    cidx = draw_contrast_indices(idx, labels[idx], order, start, count, 400)
    assert cidx.shape == (5, 401) and torch.equal(cidx[:, 0], idx)
    for row, i in zip(cidx, idx):
        negs = row[1:]
        assert (negs >= 0).all() and (negs < n).all()
        assert (labels[negs] != labels[i]).all()
        assert set(labels[negs].tolist()) == set(range(5)) - {int(labels[i])}  # every other class is drawn
        assert len(set(negs.tolist())) == int((labels != labels[i]).sum())  # and every candidate, here
    torch.manual_seed(0)
    assert torch.equal(draw_contrast_indices(idx, labels[idx], order, start, count, 400), cidx)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("options, fragment", [
    ({"crd_weight": -0.1}, "crd_weight must be >= 0"),
    ({"ce_weight": 0.0}, "nothing would train the student's classifier"),
    ({"nce_k": 0}, "nce_k must be an int >= 1"),
    ({"feat_dim": 0}, "feat_dim must be an int >= 1"),
    ({"nce_t": 0.0}, "nce_t must be > 0"),
    ({"nce_m": 1.0}, "1 would never update it"),
    ({"temperature": 0.0}, "temperature must be > 0"),
])
def test_bad_options_are_refused(options, fragment):
    assert_option_refused("crd", CRDOptions, options, fragment)


def test_non_finite_options_are_refused():
    from fusionkd.engine.config import resolve_config

    for key, value in (("crd_weight", float("nan")), ("nce_t", float("inf")), ("nce_m", float("nan"))):
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            CRDOptions(**{key: value}).validate()
        with pytest.raises(ConfigError, match=f"method 'crd': options.{key}: expected a finite number"):
            resolve_config({"method": "crd", "teacher": "t.pt", "options": {key: value}})


def test_bank_too_large_is_refused(monkeypatch):
    assert bank_bytes(50_000, 128) == 51_200_000 and bank_bytes(1_281_167, 128) == 1_311_915_008
    check_bank_fits(100, None, "cpu")  # unknown: no check
    check_bank_fits(100, 100, "cpu")
    with pytest.raises(ValueError, match="memory bank needs .* only 0 MiB are free"):
        check_bank_fits(101, 100, "cpu")
    monkeypatch.setattr(crd_module, "available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match="memory bank needs"):
        build()  # 2 x 40 x 128 x 4 = 40,960 bytes > 1,000


def test_torchrun_one_class_and_no_labels_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="all of one class"):
        build(n=10, classes=1)
    t = create_model("resnet8", num_classes=4, in_chans=1).eval()
    ctx = MethodContext(model="resnet8", num_classes=4, in_chans=1, image_size=16, epochs=2,
                        teacher=Teacher(t, "resnet8", {}))
    with pytest.raises(ValueError, match="train_labels"):
        CRD(ctx, CRDOptions())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="not available under torchrun"):
        build()


def test_mixup_is_refused_before_any_work(tmp_path):
    from fusionkd.engine.config import resolve_config

    for aug in ({"mixup": 0.4}, {"cutmix": 1.0}):
        with pytest.raises(ConfigError, match="augment.mixup=0 and augment.cutmix=0"):
            resolve_config({"method": "crd", "teacher": "t.pt", "augment": aug})
        with pytest.raises(ConfigError, match="a MixUp/CutMix image is two samples"):
            fusionkd.train(method="crd", teacher=str(tmp_path / "t.pt"), epochs=1, out_dir=str(tmp_path),
                           name="x", augment=aug, **TINY)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the engine
def test_cli_run_exact_resume_and_evaluate(tmp_path):
    run, best = two_step_cli(tmp_path, "crd", "options.nce_k=32", "options.feat_dim=16", "options.kd_weight=0.5")
    s = fusionkd.resume(run).summary  # finished already: the summary as written
    extras = s["method_extras"]["crd"]
    assert extras["bank_rows"] == 72 and extras["feat_dim"] == 16 and extras["bank_bytes"] == 2 * 72 * 16 * 4
    assert extras["z_s"] > 0 and extras["z_t"] > 0
    state = load_checkpoint(run / "last.pt")["method_state"]
    assert state["bank.memory_s"].shape == (72, 16)

    kw = dict(method="crd", teacher=str(best), epochs=2, out_dir=str(tmp_path), teacher_min_accuracy=0,
              options={"nce_k": 32, "feat_dim": 16}, **TINY)
    fusionkd.train(name="a", **kw)
    part = fusionkd.train(name="b", stop_after=1, **kw)
    assert not part.summary["finished"]
    fusionkd.resume(tmp_path / "b")
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["method_state"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["method_state"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    ev = fusionkd.evaluate_checkpoint(tmp_path / "a" / "best.pt")  # no training labels needed to evaluate
    assert set(ev["accuracy"]) == {"net"}


def test_store_loader_serves_indices(tmp_path):
    from official_trees import class_image

    from fusionkd.data import load_dataset
    from fusionkd.data.store_loader import make_loader

    root = tmp_path / "folder"
    for split, n in (("train", 6), ("test", 2)):
        for c in range(2):
            (root / split / f"k{c}").mkdir(parents=True)
            for k in range(n):
                class_image(c, k, (40, 40)).save(root / split / f"k{c}" / f"{k}.jpg")
    st = load_dataset("imagefolder", root, val_fraction=0, storage="store", cache_dir=tmp_path / "c")
    loader = make_loader(st.train, st.info, 4, train=True, with_indices=True, workers=1)
    loader.set_epoch(0)
    plan, _ = loader.plan(0)
    seen = []
    for x, y, idx in loader:
        assert torch.equal(y, st.train.labels[idx]) and x.shape[0] == idx.shape[0]
        seen.append(idx)
    assert torch.equal(torch.cat(seen), plan[:len(loader) * 4])
    with pytest.raises(ValueError, match="with_indices cannot be combined with mixup/cutmix"):
        make_loader(st.train, st.info, 4, train=True, with_indices=True, mixup=0.4, num_classes=2)


def test_registered():
    cls = METHODS.get("crd")
    assert cls is CRD and cls.family == "offline" and cls.needs_teacher and cls.needs_indices
    assert cls.Options is CRDOptions and cls.recipe_epochs == 240
    o = CRDOptions()
    assert (o.ce_weight, o.kd_weight, o.crd_weight, o.feat_dim, o.nce_k, o.nce_t, o.nce_m) == (
        1.0, 0.0, 0.8, 128, 16384, 0.07, 0.5)
    assert np.isclose(1.0 / math.sqrt(128 / 3), 0.153, atol=1e-3)  # the bank's initial range, stdv


def test_more_negatives_than_candidates_is_warned_with_the_scaled_k(caplog):
    with caplog.at_level("WARNING", logger="fusionkd"):
        build(n=40, classes=4, nce_k=30)  # 30 other-class samples per class: no warning
    assert "crd: nce_k" not in caplog.text
    with caplog.at_level("WARNING", logger="fusionkd"):
        build(n=40, classes=4, nce_k=31)
    assert "only 30 samples of other classes" in caplog.text and "K/N = 0.78" in caplog.text
    assert "consider options.nce_k=13" in caplog.text  # 40 * 16384 / 50000 = 13.1
