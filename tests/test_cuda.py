"""fusionkd's CUDA paths, prepared for the first GPU they meet (issue #27): training in every precision and
memory format (and compiled), the device loader on the GPU against the CPU, exact resume, a CUDA checkpoint
exported and loaded on the CPU, a frozen teacher on the GPU, a 1-process torchrun with NCCL and SyncBatchNorm,
and ``fusionkd compare`` placing runs on a GPU.

Every test here is marked ``cuda``; ``benchmarks/gpu_check.py`` runs them (``pytest -m cuda``). Where
``torch.cuda.is_available()`` they run on ``cuda``; elsewhere they skip, except in the **rehearsal**:
``FUSIONKD_CUDA_TESTS_ON_CPU=1`` runs every test whose logic can run on a CPU there instead (on any machine,
CUDA or not), so that the tests themselves are checked before a GPU is ever lent. What cannot run on a CPU
(``precision=fp16``, which fusionkd refuses there; NCCL) skips in the rehearsal, saying why. In the
rehearsal ``compile=true`` compiles with the ``aot_eager`` backend (dynamo and AOT autograd, no code
generation: seconds instead of ~35 s per case on these CPUs); on a GPU it is the default, inductor.

Every run is tiny (synthetic 3x16x16 data of 4 classes, 48 training images, batch 16, 1-2 epochs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusionkd
from fusionkd.cli import main
from fusionkd.data import DeviceLoader, load_dataset
from fusionkd.engine.checkpoint import build_deploy_model, load_checkpoint
from fusionkd.engine.config import resolve_config
from fusionkd.engine.trackers import Callback
from fusionkd.engine.trainer import Trainer

pytestmark = pytest.mark.cuda

HERE = Path(__file__).resolve().parent
#: the rehearsal: run on the CPU what can run there
ON_CPU = os.environ.get("FUSIONKD_CUDA_TESTS_ON_CPU") == "1"
DATA = {"num_classes": 4, "in_chans": 3, "train_size": 64, "test_size": 16}
TINY = dict(model="resnet20", dataset="synthetic", dataset_options=DATA, image_size=16, val_fraction=0.25,
            batch_size=16, eval_batch_size=16, epochs=1, lr=0.05, progress="none", threads=1)


@pytest.fixture
def device() -> str:
    """``cuda``; ``cpu`` in the rehearsal; without either the test skips."""
    if ON_CPU:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs a CUDA device (FUSIONKD_CUDA_TESTS_ON_CPU=1 rehearses these tests on the CPU)")


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in float32 on the GPU (by default cuDNN runs float32 convolutions in TF32,
    ~1e-3 relative), restored after the test. (Plain get/set: these flags are properties of module objects.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = saved


def cuda_only(device: str, why: str) -> None:
    """Skip in the rehearsal: what the test checks exists on CUDA only."""
    if device != "cuda":
        pytest.skip(f"CPU rehearsal: {why}")


def settings(tmp_path: Path, device: str, name: str, **kw) -> dict:
    return {**TINY, "method": "baseline", "device": device, "out_dir": str(tmp_path / "runs"), "name": name, **kw}


def subprocess_env() -> dict[str, str]:
    """This environment, with fusionkd's src/ first on PYTHONPATH (the GPU machine runs from the checkout)."""
    path = [str(HERE.parent / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}


class TrainingOutputDtypes(Callback):
    """Records the dtype of the deployed network's logits in every training forward pass: what autocast made of
    them (a forward hook set when the run starts, on the network itself, which is never compiled)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.dtypes, self.handle = trainer, set(), None

    def on_run_start(self, config, run_dir, start_epoch) -> None:
        self.handle = self.trainer.method.deploy_model().register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        if module.training:
            self.dtypes.add(out.dtype)

    def on_run_end(self, summary, run_dir, error) -> None:
        if self.handle is not None:
            self.handle.remove()


def fit(cfg: dict) -> tuple[Trainer, TrainingOutputDtypes, dict]:
    trainer = Trainer(resolve_config(cfg))
    probe = TrainingOutputDtypes(trainer)
    trainer.callbacks.append(probe)
    return trainer, probe, trainer.fit().summary


def assert_on(module: torch.nn.Module, device: str) -> None:
    """Every parameter and buffer of ``module`` lives on ``device``."""
    off = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type != device]
    assert not off, f"not on {device}: {off[:5]}"


def assert_hardware(summary: dict, device: str) -> None:
    hw = summary["hardware"]
    if device == "cuda":
        assert hw["device"].startswith("cuda") and hw.get("gpu"), hw
    else:
        assert hw["device"] == "cpu", hw


def assert_finite_metrics(run_dir: Path, epochs: int) -> list[dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1))
    for m in lines:
        assert m["train"] and all(math.isfinite(v) for v in m["train"].values()), m["train"]
        assert m["val"] and all(0 <= v <= 100 for v in m["val"].values()), m["val"]
    return lines


# ---------------------------------------------------------------------- a. precision x memory format
def check_training(tmp_path: Path, device: str, precision: str, channels_last: bool, compile: bool) -> Trainer:
    """One run; finite losses, checkpoints, the device in summary.json, the grad scaler's state in the checkpoint
    (fp16 only), the logits' dtype under autocast, and where and in which memory format the parameters are."""
    name = f"{precision}-{'cl' if channels_last else 'nchw'}{'-compiled' if compile else ''}"
    trainer, probe, summary = fit(settings(tmp_path, device, name, precision=precision,
                                           channels_last=channels_last, compile=compile))
    run = trainer.run_dir
    assert_finite_metrics(run, 1)
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    assert_hardware(summary, device)
    assert summary["hardware"]["distributed"] is None
    assert probe.dtypes == {{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]}

    raw = torch.load(run / "last.pt", weights_only=True)  # as written: each tensor where it lived
    momenta = [t for s in raw["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert momenta and all(t.device.type == device for t in momenta), "the optimizer state is not on the device"
    assert all(t.device.type == device for t in raw["method_state"].values())
    scaler = load_checkpoint(run / "last.pt")["scaler"]
    if precision == "fp16":  # GradScaler.state_dict(): the scale it reached, its growth settings and tracker
        assert isinstance(scaler, dict) and math.isfinite(scaler["scale"]) and scaler["scale"] > 0, scaler
        assert {"growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= set(scaler)
    else:
        assert scaler is None

    method = trainer.method
    assert_on(method, device)
    convs = [(n, p) for n, p in method.named_parameters() if p.dim() == 4]
    assert convs
    if channels_last:
        wrong = [n for n, p in convs if not p.is_contiguous(memory_format=torch.channels_last)]
    else:
        wrong = [n for n, p in convs if not p.is_contiguous()]
    assert not wrong, f"not in the asked memory format (channels_last={channels_last}): {wrong[:5]}"
    for p in method.parameters():
        assert torch.isfinite(p).all()
    return trainer


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_in_every_precision_and_memory_format(tmp_path, device, precision, channels_last):
    if precision == "fp16":
        cuda_only(device, "fusionkd refuses precision=fp16 on a CPU (float16 autocast with a grad scaler is CUDA's)")
    check_training(tmp_path, device, precision, channels_last, compile=False)


# ---------------------------------------------------------------------- b. the device loader
def _assert_same_plan(a, b, what: str) -> None:
    """Two epoch plans (dataclasses of CPU tensors, possibly nested, possibly None) are identical."""
    if a is None or b is None:
        assert a is None and b is None, what
        return
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
        return
    for f in dataclasses.fields(a):
        _assert_same_plan(getattr(a, f.name), getattr(b, f.name), f"{what}.{f.name}")


LOADER_CASES = {
    # crop with reflect padding, flip, cutout, and MixUp or CutMix on every batch (one of them, drawn per batch)
    "mixing": dict(crop_padding=4, padding_mode="reflect", cutout=4, mixup=0.4, cutmix=1.0, mix_prob=1.0),
    # RandAugment (two ops per image) on top of zero-padded crop, flip and cutout
    "randaugment": dict(crop_padding=4, cutout=4, randaugment=2, randaugment_magnitude=9),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", sorted(LOADER_CASES))
def test_device_loader_draws_and_batches_equal_the_cpus(device, case, channels_last, no_tf32):
    """A DeviceLoader on the device serves what the same loader on the CPU serves, for the same seed: the same
    epoch plans (permutation, crops, flips, cutouts, MixUp/CutMix draws, RandAugment ops, all drawn on the CPU),
    the same labels (soft targets when mixed) and, within float32 rounding, the same images, over two epochs.

    Images: crop, flip, cutout, normalisation and mixing are gathers and elementwise float32 ops, so they agree
    to float32 rounding (``assert_close``'s float32 defaults). RandAugment's geometric ops sample the nearest
    pixel and posterize floors, so a last-bit difference (a convolution's summation order in ``sharpness``,
    ``cos`` / ``sin`` in ``rotate``) can move a rare pixel to its neighbour's value: there at most 1 % of the
    values may differ by more than 1e-3 (TF32, which would make ``sharpness`` ~1e-3 coarse, is switched off).

    In the CPU rehearsal this compares the CPU with the CPU: it still runs every line of the comparison."""
    aug = LOADER_CASES[case]
    splits = load_dataset("synthetic", val_fraction=0.0, image_size=16, **DATA)
    kw = dict(train=True, seed=7, num_classes=4, channels_last=channels_last, **aug)
    cpu = DeviceLoader(splits.train, splits.info, 16, device="cpu", **kw)
    dev = DeviceLoader(splits.train, splits.info, 16, device=device, **kw)
    modes = set()
    for epoch in (0, 1):
        _assert_same_plan(cpu.plan(epoch), dev.plan(epoch), f"epoch {epoch}")
        if cpu.plan(epoch).mix is not None:
            modes |= set(cpu.plan(epoch).mix.mode.tolist())
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        n = 0
        for (xc, yc), (xd, yd) in zip(cpu, dev, strict=True):
            n += 1
            assert xd.device.type == device and yd.device.type == device
            assert xd.dtype == xc.dtype == torch.float32 and xd.shape == xc.shape
            if channels_last:
                assert xd.is_contiguous(memory_format=torch.channels_last)
                assert xc.is_contiguous(memory_format=torch.channels_last)
            if case == "mixing":  # soft targets (B, 4): lam * onehot(y) + (1 - lam) * onehot(y[perm])
                assert yd.dtype == torch.float32 and yd.shape == (xd.shape[0], 4)
                torch.testing.assert_close(yd.cpu(), yc)
                torch.testing.assert_close(xd.cpu(), xc)
            else:
                assert torch.equal(yd.cpu(), yc)
                assert torch.isfinite(xd).all()
                off = ((xd.cpu() - xc).abs() > 1e-3).float().mean().item()
                assert off <= 0.01, f"{100 * off:.2f} % of the values differ by more than 1e-3"
        assert n == len(cpu) == 4
    if case == "mixing":
        assert modes == {1, 2}, modes  # this seed draws both MixUp and CutMix batches

    evals = [DeviceLoader(splits.test, splits.info, 6, train=False, device=d, channels_last=channels_last)
             for d in ("cpu", device)]
    for (xc, yc), (xd, yd) in zip(*evals, strict=True):  # evaluation: unaugmented, in order, the last batch short
        torch.testing.assert_close(xd.cpu(), xc)
        assert torch.equal(yd.cpu(), yc)


# ---------------------------------------------------------------------- c. exact resume
@pytest.mark.slow
def test_exact_resume_under_deterministic_settings(tmp_path, device):
    """A run stopped after epoch 1 and resumed ends bit-identical to the same run uninterrupted, on the device.

    Run by tests/cuda_resume_worker.py in a process of its own, which switches PyTorch's determinism settings
    on before CUDA initialises: ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, ``torch.use_deterministic_algorithms(True)``
    (``warn_only``: an op without a deterministic kernel is reported, not fatal), ``cudnn.deterministic=True``,
    ``cudnn.benchmark=False``. Without them agreement is only expected to be close: cuDNN may choose another
    convolution algorithm from one run to the next (benchmark mode times candidates; algorithms sum in
    different orders), and some CUDA kernels accumulate with atomics in whatever order threads finish, so
    floating-point sums can differ in their last bits and the differences grow over steps. fusionkd restores
    everything else exactly (weights, optimizer, schedule, grad scaler, every RNG; the batches are a function of
    seed and epoch), which is what this test checks. On a CPU runs are bit-reproducible without any setting."""
    cfg = settings(tmp_path, device, "unused", epochs=2)
    out = tmp_path / "resume.pt"
    env = {**subprocess_env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    proc = subprocess.run([sys.executable, str(HERE / "cuda_resume_worker.py"), json.dumps(cfg), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = torch.load(out, weights_only=True)
    assert r["deterministic"] and not r["cuda_initialised_before_settings"]
    assert r["stopped_at"] == 1
    full, resumed = r["full"], r["resumed"]
    assert full["device"].startswith(device) and resumed["device"].startswith(device)
    alerts = "; ".join(r["alerts"]) or "none"
    assert full["params"].keys() == resumed["params"].keys()
    for kind in ("params", "buffers"):
        for k, v in full[kind].items():
            diff = (v.double() - resumed[kind][k].double()).abs().max().item() if v.is_floating_point() else None
            assert torch.equal(v, resumed[kind][k]), \
                f"{kind} {k}: resumed != uninterrupted (max abs diff {diff}; nondeterminism alerts: {alerts})"
    a, b = r["summaries"]
    assert a["best"] == b["best"] and a["last"] == b["last"]
    assert_hardware(a, device)
    assert_hardware(b, device)


# ---------------------------------------------------------------------- d. export
def test_device_checkpoint_exports_and_loads_on_cpu(tmp_path, device, no_tf32):
    """A checkpoint written on the device (CUDA tensors) exports (``fusionkd.export_checkpoint``: a
    ``torch.export`` program, a deploy file, metadata) and loads on the CPU, with the device's exact weights; on
    a fixed batch the CPU logits of the exported program and of the deploy file equal the device network's
    within float32 tolerance: ``rtol=1e-4, atol=1e-4`` (the same float32 arithmetic summed in another order
    over 20 layers; TF32 is switched off for the device's forward pass, which would make it ~1e-3 coarse)."""
    trainer, _, _ = fit(settings(tmp_path, device, "export"))
    raw = torch.load(trainer.run_dir / "best.pt", weights_only=True)  # as written: tensors on the device
    assert next(iter(raw["deploy"]["state_dict"].values())).device.type == device

    written = fusionkd.export_checkpoint(trainer.run_dir / "best.pt", tmp_path / "export" / "student")
    assert set(written) >= {"program", "deploy", "metadata"} and written["max_abs_diff"] < 1e-4
    meta = json.loads(Path(written["metadata"]).read_text())
    assert meta["input_shape"] == [3, 16, 16] and meta["model"] == "resnet20"

    net = trainer.method.deploy_model().eval()
    on_cpu = build_deploy_model(load_checkpoint(written["deploy"])).eval()
    for k, v in net.state_dict().items():  # the device's weights, exactly, now on the CPU
        got = on_cpu.state_dict()[k]
        assert got.device.type == "cpu" and torch.equal(got, v.cpu()), k
    program = torch.export.load(written["program"]).module()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x.to(device)).float().cpu()
        from_deploy = on_cpu(x)
        from_program = program(x)
    assert want.shape == (8, 4)
    torch.testing.assert_close(from_deploy, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_program, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- e. a teacher on the device
def test_frozen_teacher_on_the_device(tmp_path, device):
    """A baseline teacher trained on the device, then ``kd`` from its best.pt on the device: the teacher (weights
    and BatchNorm statistics) lives on the device, stays in eval mode and is bit-identical to its file after
    the student trained."""
    teacher_run = fusionkd.train(**settings(tmp_path, device, "teacher"))
    teacher_file = teacher_run.run_dir / "best.pt"
    trainer, probe, summary = fit(settings(tmp_path, device, "kd", method="kd", teacher=str(teacher_file),
                                           teacher_min_accuracy=0))
    assert_finite_metrics(trainer.run_dir, 1)
    assert_hardware(summary, device)
    assert summary["method_extras"]["teacher"]["model"] == "resnet20"
    method = trainer.method
    assert_on(method, device)  # student and teacher
    teacher = method.teacher
    assert_on(teacher, device)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    original = load_checkpoint(teacher_file)["deploy"]["state_dict"]
    now = teacher.state_dict()
    assert now.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(now[k].cpu(), v), f"the teacher's {k} changed"
    assert probe.dtypes == {torch.float32}


# ---------------------------------------------------------------------- f. torchrun with NCCL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_process_torchrun_with_nccl_and_sync_bn(tmp_path, device):
    """The real torchrun, one process on the GPU: it forms an NCCL group of one (recorded in summary.json as
    ``hardware.distributed``), trains through DDP with SyncBatchNorm layers (sync_bn=true; in a world of one
    they normalise as BatchNorm does), writes the run folder, and tears the group down. The CPU twin (gloo,
    no sync_bn) is tests/test_distributed.py::test_one_process_torchrun_forms_a_gloo_group_and_equals_a_plain_run."""
    cuda_only(device, "NCCL and SyncBatchNorm need CUDA (the gloo twin runs in tests/test_distributed.py)")
    cfg = settings(tmp_path, device, "nccl", epochs=2, sync_bn=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(HERE / "ddp_worker.py"), json.dumps(cfg), str(tmp_path)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", map_location="cpu", weights_only=True)
    assert not (tmp_path / "rank1.pt").exists()
    assert r0["summary"]["hardware"]["distributed"] == {"world_size": 1, "backend": "nccl"}
    assert r0["summary"]["hardware"]["device"] == "cuda:0" and r0["summary"]["hardware"].get("gpu")
    assert r0["sync_bn_layers"] > 0
    assert r0["teardown"] == {"ddp_wrappers": 0, "group_alive": False}
    assert all(torch.isfinite(v).all() for v in r0["params"].values())
    run = tmp_path / "runs" / "nccl"
    assert_finite_metrics(run, 2)
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    assert json.loads((run / "summary.json").read_text())["hardware"]["distributed"]["backend"] == "nccl"


# ---------------------------------------------------------------------- g. compare on the device
@pytest.mark.parametrize("workers", [1, 2], ids=["in_process", "worker_processes"])
def test_compare_places_runs_on_the_device(tmp_path, device, workers, request):
    """``fusionkd compare --devices D`` (two seeds of baseline): one worker trains both runs in the compare
    process; ``--devices D,D`` gives two worker processes that device each. Every run's summary.json records it."""
    if workers > 1:
        request.applymarker(pytest.mark.slow)
    dev = "cuda:0" if device == "cuda" else "cpu"
    out = tmp_path / "cmp"
    kv = [f"{k}={v}" for k, v in TINY.items() if k not in ("model", "dataset", "dataset_options", "progress",
                                                           "threads")]
    kv += [f"dataset_options.{k}={v}" for k, v in DATA.items()]
    argv = ["compare", "--methods", "baseline", "--models", "resnet20", "--dataset", "synthetic", "--seeds", "0,1",
            "--out", str(out), "--threads", "1", "--devices", ",".join([dev] * workers), *kv]
    assert main(argv) == 0
    summaries = sorted((out / "runs").rglob("summary.json"))
    assert len(summaries) == 2 and (out / "results.csv").is_file()
    for path in summaries:
        s = json.loads(path.read_text())
        assert s["finished"] and s["hardware"]["device"] == dev, (path, s["hardware"])
        if device == "cuda":
            assert s["hardware"].get("gpu")
    assert {json.loads(p.read_text())["seed"] for p in summaries} == {0, 1}


# ---------------------------------------------------------------------- a. compiled (last: the slowest)
@pytest.fixture
def rehearsal_compile(device, monkeypatch):
    """In the CPU rehearsal, ``compile=true`` compiles with ``aot_eager`` (see the module's docstring)."""
    if device == "cpu":
        plain = torch.nn.Module.compile

        def compile(self, *args, **kwargs):
            kwargs.setdefault("backend", "aot_eager")
            return plain(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "compile", compile)


@pytest.mark.slow
@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)],
                         ids=["compile-fp32", "compile-bf16-channels_last"])
def test_training_compiled(tmp_path, device, rehearsal_compile, precision, channels_last):
    """``compile=true`` (torch.compile of every stem, stage and head), with the checks of the eager cases."""
    trainer = check_training(tmp_path, device, precision, channels_last, compile=True)
    parts = [m for m in trainer.method.modules() if getattr(m, "_fusionkd_compiled", False)]
    assert len(parts) == 5  # resnet20: stem, three stages, head
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in parts)
