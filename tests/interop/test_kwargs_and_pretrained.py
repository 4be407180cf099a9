"""``model_kwargs`` / ``teacher_model_kwargs`` and ``pretrained=true`` against the real torchvision and timm
(skipped without them): a timm ViT at 28 px with 4 px patches trained, resumed, evaluated and used as a teacher
(from its run and from a weights file), the package refusing a keyword, and ``pretrained=true`` offline:
refused in one line naming the network and ``weights=FILE`` (downloads made to fail: ``HF_HUB_OFFLINE=1`` and
empty caches for timm, torch.hub's downloader raising for torchvision), and its local-file equivalents
(``weights=FILE``; timm's ``pretrained_cfg_overlay={file: ...}``; a file already in torch.hub's cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import fusionkd  # noqa: E402
from fusionkd.engine.checkpoint import build_deploy_model, load_checkpoint  # noqa: E402
from fusionkd.engine.config import ConfigError  # noqa: E402
from fusionkd.models import TokenBackbone, create_model  # noqa: E402
from fusionkd.models.registry import model_extras  # noqa: E402

from .common import VIT, tiny  # noqa: E402

pytestmark = pytest.mark.interop

TINY = tiny(image_size=28, train_size=32, test_size=8, batch_size=8)
SMALL = {"img_size": 28, "patch_size": 4, "depth": 2}  # a 2-block ViT-Tiny on 7x7 patches: fast


def test_a_vit_with_its_keywords_trains_resumes_evaluates_and_teaches(tmp_path):
    out = str(tmp_path)
    t = fusionkd.train(method="baseline", model=VIT, model_kwargs=SMALL, out_dir=out, name="vit", **TINY)
    best = load_checkpoint(t.run_dir / "best.pt")
    assert best["deploy"]["model_kwargs"] == SMALL
    net = build_deploy_model(best)  # what eval/export/teacher= rebuild: the 28 px, 4 px-patch, 2-block network
    assert isinstance(net, TokenBackbone) and net.image_size == 28 and net.patch == 4 and len(net.module.blocks) == 2
    assert fusionkd.resume(t.run_dir, epochs=2).summary["epochs"] == 2
    assert fusionkd.api.evaluate_checkpoint(t.run_dir / "best.pt") is not None
    for method in ("kd", "fitnet"):  # the run as a teacher: its logits and its token maps (stride 4)
        r = fusionkd.train(method=method, model="resnet20", teacher=str(t.run_dir / "best.pt"),
                           teacher_min_accuracy=0.0, out_dir=out, name=method, **TINY)
        assert load_checkpoint(r.run_dir / "last.pt")["teacher"]["model_kwargs"] == SMALL
        assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2  # the teacher rebuilt with them
    # a weights file of that network as an outside teacher: teacher_model_kwargs
    path = tmp_path / "vit.pth"
    torch.save(net.module.state_dict(), path)
    r = fusionkd.train(method="kd", model="resnet20", teacher_model=VIT, teacher_weights=str(path),
                       teacher_model_kwargs=SMALL, teacher_min_accuracy=0.0, out_dir=out, name="outside", **TINY)
    assert load_checkpoint(r.run_dir / "last.pt")["teacher"]["model_kwargs"] == SMALL
    assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2


@pytest.mark.parametrize("method", ["dkd", "dist", "crd", "at", "mfkd", "reviewkd"])
def test_a_vit_teaches_a_cnn_student_with_every_other_offline_method(tmp_path, method):
    """kd and fitnet are tested above; the rest read the ViT's logits (dkd, dist), its pooled last tokens (crd)
    or its token maps at stride 4 (at pairs them with the student's stride-4 stage; mfkd fuses them; reviewkd
    reviews them)."""
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model(VIT[5:], num_classes=4, in_chans=1, **SMALL).state_dict(), path)
    r = fusionkd.train(method=method, model="resnet20", teacher_model=VIT, teacher_weights=str(path),
                       teacher_model_kwargs=SMALL, teacher_min_accuracy=0.0, out_dir=str(tmp_path), name=method,
                       **{**TINY, "epochs": 2})
    assert r.summary["finished"]


def test_a_vit_member_of_several_teachers_takes_its_keywords_as_a_mapping(tmp_path):
    """``teachers=[CHECKPOINT, {model, weights, kwargs}]``: the ViT's keywords reach timm, its input size is
    checked against the run's before any work (without them it is a 224 px network), and a resumed run
    rebuilds it from the checkpoint."""
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model(VIT[5:], num_classes=4, in_chans=1, **SMALL).state_dict(), path)
    cnn = fusionkd.train(method="baseline", model="resnet8", out_dir=str(tmp_path), name="cnn", **TINY)
    common = dict(method="kd", model="resnet20", teacher_min_accuracy=0.0, out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match="teachers item 'timm:vit_tiny_patch16_224' takes 224x224 images"):
        fusionkd.train(teachers=[str(cnn.run_dir / "best.pt"), {"model": VIT, "weights": str(path)}], name="no",
                       **common)
    assert not (tmp_path / "no").exists()
    member = {"model": VIT, "weights": str(path), "kwargs": SMALL}
    r = fusionkd.train(teachers=[str(cnn.run_dir / "best.pt"), member], name="mix", **common)
    assert load_checkpoint(r.run_dir / "last.pt")["teacher"]["members"][1]["model_kwargs"] == SMALL
    path.unlink()
    assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2


def test_package_keywords_are_checked_before_any_work(tmp_path):
    run = dict(out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match="timm refused them .*unexpected keyword argument 'bogus'"):
        fusionkd.train(method="baseline", model=VIT, model_kwargs={**SMALL, "bogus": 1}, **run)
    with pytest.raises(ConfigError, match="torchvision refused them .*'bogus'"):
        fusionkd.train(method="baseline", model="torchvision:resnet18", model_kwargs={"bogus": 1}, **run)
    for key in ("num_classes", "in_chans", "pretrained"):
        with pytest.raises(ConfigError, match=f"'{key}' is set by fusionkd"):
            fusionkd.train(method="baseline", model=VIT, model_kwargs={**SMALL, key: 1}, **run)
    with pytest.raises(ConfigError, match=r"takes 32x32 images .*model_kwargs=\{img_size: 28\}"):
        fusionkd.train(method="baseline", model=VIT, model_kwargs={"img_size": 32, "patch_size": 4}, **run)
    assert "image_size" not in model_extras(VIT, {"dynamic_img_size": True})  # any size then
    assert model_extras(VIT, SMALL)["image_size"] == 28 and model_extras(VIT, {})["image_size"] == 224
    with pytest.raises(ConfigError, match="either pretrained=true .* or weights=FILE"):
        fusionkd.train(method="baseline", model="torchvision:resnet18", pretrained=True,
                       weights=str(tmp_path / "w.pth"), **run)
    r = fusionkd.train(method="baseline", model="torchvision:resnet18", out_dir=str(tmp_path), name="tv",
                       model_kwargs={"zero_init_residual": True}, **{**TINY, "image_size": 32, "lr": 1e-9})
    ckpt = load_checkpoint(r.run_dir / "last.pt")
    assert ckpt["deploy"]["model_kwargs"] == {"zero_init_residual": True}
    assert build_deploy_model(ckpt).module.layer1[0].bn2.weight.abs().max() < 1e-4  # built with it (else 1)


def test_pretrained_offline_is_refused_in_one_line_naming_the_network(tmp_path):
    """timm: through the CLI in a subprocess with ``HF_HUB_OFFLINE=1`` and empty HF/torch caches (no request
    is made, so nothing waits on the network), exit code 2 and one error line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fusionkd", "train", "--method", "baseline", "--model", "timm:resnet18",
           "--dataset", "synthetic", "dataset_options={num_classes: 4, in_chans: 1, train_size: 32, test_size: 8}",
           "image_size=32", "epochs=1", "batch_size=8", "progress=none", "pretrained=true", f"out_dir={tmp_path}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if "pretrained=true" in line]
    assert len(errors) == 1 and "the published weights of 'timm:resnet18' could not be downloaded" in errors[0]
    assert "weights=FILE" in errors[0] and "pretrained_cfg_overlay" in errors[0]
    assert not list(tmp_path.glob("synthetic/*/last.pt"))  # refused before any epoch


def test_pretrained_torchvision_download_failure_and_its_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match="published weights of 'torchvision:resnet18' could not be downloaded "
                                          r"\(URLError: .*offline \(test\).*weights=FILE"):
        fusionkd.train(method="baseline", model="torchvision:resnet18", pretrained=True, out_dir=str(tmp_path),
                       **{**TINY, "image_size": 32})
    # the published file already in torch.hub's cache (as a machine with internet leaves it): used, adapted to
    # 4 classes and 1 input channel like weights=FILE, and only for a new run (a resume takes its checkpoint)
    published = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18()
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(theirs.state_dict(), cache / os.path.basename(published.url))
    r = fusionkd.train(method="baseline", model="torchvision:resnet18", pretrained=True, out_dir=str(tmp_path),
                       name="cached", **{**TINY, "image_size": 32, "lr": 1e-9})
    net = r.load_deploy_model("last")  # lr 1e-9: still the file's weights
    assert torch.allclose(net.module.layer4[1].conv2.weight, theirs.layer4[1].conv2.weight, atol=1e-6)
    assert net.module.fc.out_features == 4 and net.module.conv1.in_channels == 1
    assert fusionkd.resume(r.run_dir, epochs=2).summary["epochs"] == 2


def test_timm_pretrained_from_a_local_file_is_adapted_to_the_run(tmp_path):
    """The local-file equivalent for timm: ``pretrained=true`` with ``pretrained_cfg_overlay={file: ...}``
    (timm's own loading: classifier dropped, patch embedding and position embedding resampled to 28 px / 4 px
    patches, 1 input channel); the blocks' weights are the file's."""
    torch.manual_seed(0)
    theirs = timm.create_model(VIT[5:], depth=2)  # a "published" 224 px, 3-channel, 1000-class ViT-Tiny
    path = tmp_path / "vit_published.pth"
    torch.save(theirs.state_dict(), path)
    net = create_model(VIT, num_classes=4, in_chans=1, pretrained=True, **SMALL,
                       pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(net.module.blocks[1].attn.qkv.weight, theirs.blocks[1].attn.qkv.weight)
    assert net.module.patch_embed.proj.weight.shape == (192, 1, 4, 4) and net.module.head.out_features == 4
    r = fusionkd.train(method="baseline", model=VIT, pretrained=True, out_dir=str(tmp_path), name="vit",
                       model_kwargs={**SMALL, "pretrained_cfg_overlay": {"file": str(path)}}, **{**TINY, "lr": 1e-9})
    got = r.load_deploy_model("last").module.blocks[1].attn.qkv.weight
    assert torch.allclose(got, theirs.blocks[1].attn.qkv.weight, atol=1e-6)
