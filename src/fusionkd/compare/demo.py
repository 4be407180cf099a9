"""``fusionkd demo`` (what ``make demo`` runs): a small, honest comparison on real data.

``baseline`` vs one online fusion method (``ffl``) and one self fusion method (``frskd``), whichever of them
are registered, on Fashion-MNIST with ResNet-20: a stratified training subset, a 10 % validation split
(6,000 images) for model selection, the full 10,000-image test set, cosine lr, channels-last, bf16 autocast
where it is measured faster (``--precision auto``: a GPU, or a CPU where a few timed steps show it; fp32
elsewhere), one seed, two worker processes with one thread each. It prints the deploy-head and
auxiliary-head test accuracy at the last and at the best-validation epoch, and the time taken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import METHODS
from .aggregate import GroupStats
from .grid import CompareResult, CompareSpec, compare

#: the methods of the demo, in the order they are started (costliest first, so two workers finish together)
DEMO_METHODS = ("ffl", "frskd", "baseline")
DEMO_MODEL = "resnet20"
#: sized so that the demo finishes within 10 minutes on 2 CPU cores (docs/compare.md has the measurement)
DEMO_EPOCHS = 6
DEMO_SUBSET = 5000
#: method settings for a run this short: FRSKD's alpha=2/beta=100 are its 200-epoch settings; 0.8/37 were
#: chosen on validation by the tune study of docs/tune.md (2,000 images, 4 epochs; 3-seed confirmation)
DEMO_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"frskd": {"options.alpha": 0.8, "options.beta": 37.0}}


#: Fashion-MNIST's training images, from which the demo carves its validation split
FASHION_MNIST_TRAIN_IMAGES = 60_000


def demo_val_images(subset: int) -> int:
    """The demo's validation split: a fifth of its training subset (at least 500 images), so that evaluating
    it every epoch costs a fraction of the epoch's training instead of more than the training itself (10 %
    of Fashion-MNIST, 6,000 images, against a 5,000-image subset did)."""
    return max(500, subset // 5)


def demo_options(epochs: int, subset: int, precision: str = "bf16") -> dict[str, Any]:
    """The common config of the demo's runs."""
    val_fraction = round(demo_val_images(subset) / FASHION_MNIST_TRAIN_IMAGES, 6)
    return {"dataset": "fashion-mnist", "subset": subset, "val_fraction": val_fraction, "epochs": epochs,
            "schedule": "cosine", "precision": precision, "channels_last": True, "batch_size": 128}


@dataclass
class DemoResult:
    result: CompareResult
    methods: list[str]
    missing: list[str]
    wall_s: float
    options: dict[str, Any] = field(default_factory=dict)


def measure_cpu_precision(threads: int = 1, steps: int = 4, batch: int = 64) -> dict[str, float]:
    """Training img/s of the demo's network (ResNet-20, 1x28x28, channels_last) in fp32 and under bf16
    autocast on this CPU: a few seconds, in this process, with ``threads`` threads (the workers' count)."""
    import contextlib
    import time

    import torch

    from ..models import create_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=g)
        for prec in ("fp32", "bf16"):
            net = create_model("resnet20", num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()
            best = float("inf")
            for i in range(steps + 2):  # two warm-up steps (oneDNN picks and caches its kernels)
                t0 = time.perf_counter()
                with amp:
                    loss = torch.nn.functional.cross_entropy(net(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= 2:
                    best = min(best, time.perf_counter() - t0)
            out[prec] = batch / best
    finally:
        torch.set_num_threads(before)
    return out


def resolve_precision(precision: str, threads: int = 1) -> tuple[str, str]:
    """``(precision, why)`` for the demo. "auto": bf16 on a GPU; on a CPU, whichever of fp32 and bf16 trained
    the demo's network faster in a few measured steps (bf16's speed depends on the CPU: AMX, AVX-512-BF16 or
    neither, and on oneDNN; docs/results.md)."""
    if precision != "auto":
        return precision, "as asked"
    import torch

    if torch.cuda.is_available():
        return "bf16", "a CUDA GPU is present"
    speed = measure_cpu_precision(threads)
    choice = "bf16" if speed["bf16"] > 1.1 * speed["fp32"] else "fp32"  # bf16 only when clearly faster
    return choice, (f"measured here: fp32 {speed['fp32']:,.0f} img/s, bf16 {speed['bf16']:,.0f} img/s "
                    f"(ResNet-20, batch 64, {threads} thread(s)); bf16 is used only when >10 % faster")


def demo(out: str | Path = "runs/demo", *, epochs: int = DEMO_EPOCHS, subset: int = DEMO_SUBSET,
         precision: str = "auto", workers: int = 2, threads: int = 1,
         report: Callable[[str], None] | None = None, common: dict[str, Any] | None = None) -> DemoResult:
    """Run the demo comparison into ``out`` (runs made with other settings are replaced).

    ``precision="auto"``: bf16 on a GPU, and on a CPU where a few measured steps show it faster, else fp32;
    docs/results.md has the paired fp32/bf16 study behind that choice (no accuracy cost found)."""
    precision, why = resolve_precision(precision, threads)
    if report is not None:
        report(f"precision {precision}: {why}")
    methods = [m for m in DEMO_METHODS if m in METHODS]
    missing = [m for m in DEMO_METHODS if m not in METHODS]
    options = {**demo_options(epochs, subset, precision), **(common or {})}  # the user's options win
    spec = CompareSpec(methods=methods, models=[DEMO_MODEL], seeds=[0], out=Path(out), common=options,
                       method_options={m: o for m, o in DEMO_METHOD_OPTIONS.items() if m in methods},
                       workers=max(1, min(workers, len(methods))), threads=threads, rerun_changed=True,
                       title="fusionkd demo",
                       command=f"fusionkd demo --epochs {epochs} --subset {subset} --precision {precision} "
                               f"--out {out}" + "".join(f" {k}={json.dumps(v)}" for k, v in (common or {}).items()))
    t0 = time.perf_counter()
    result = compare(spec, report=report)
    return DemoResult(result, methods, missing, time.perf_counter() - t0, options)


def _acc(stat) -> str:
    return "-" if stat.mean is None else f"{stat.mean:.2f}"


def demo_table(res: DemoResult) -> str:
    """The table ``fusionkd demo`` prints."""
    groups: list[GroupStats] = res.result.report.groups
    cfg = res.result.tasks[0].config
    sizes = ""
    summary = res.result.tasks[0].run_dir / "summary.json"
    if summary.is_file():
        d = json.loads(summary.read_text())["data"]
        sizes = f"{d['train']:,} train (stratified subset) / {d['val']:,} val / {d['test']:,} test images; "
    lines = [
        f"{cfg.model} on {cfg.dataset}: {sizes}{cfg.epochs} epochs, {cfg.schedule} lr, {cfg.precision}"
        + (", channels_last" if cfg.channels_last else "") + f", seed {cfg.seed}",
        f"{'method':<10} {'family':<8} {'deploy':<7} {'last':>6} {'best-val':>8}   {'aux head':<9} "
        f"{'last':>6} {'best-val':>8}   {'train time':>10}",
    ]
    for g in groups:
        lines.append(
            f"{g.method:<10} {g.family:<8} {','.join(g.deploy_heads):<7} {_acc(g.deploy_last):>6} "
            f"{_acc(g.deploy_best):>8}   {g.aux_head or '-':<9} {_acc(g.aux_last):>6} "
            f"{_acc(g.aux_best):>8}   "
            f"{g.train_time_s.mean or 0:>9.0f}s"
        )
    lines.append("test accuracy in %: 'last' after the final epoch, 'best-val' at the epoch of best "
                 "validation accuracy of that head; aux = the best non-deployed head (fused / self-teacher)")
    lines.append("what this means: one seed and a few epochs on a subset, a check that every method trains and "
                 "which heads it has, not a ranking (seed-to-seed spread here is about 1 point). frskd runs "
                 "with alpha=0.8/beta=37, chosen on validation for short runs (docs/tune.md); its paper's "
                 "alpha=2/beta=100 are for 200 epochs and hold its network back this short, in fp32 as in bf16 "
                 "(docs/compare.md). docs/results.md has the multi-seed comparisons")
    m, s = divmod(int(round(res.wall_s)), 60)
    lines.append(f"wall time {m}m{s:02d}s, including data loading and evaluation")
    if res.missing:
        lines.append(f"not registered in this installation, left out: {', '.join(res.missing)}")
    lines.append(f"report: {res.result.report.markdown}")
    return "\n".join(lines)
