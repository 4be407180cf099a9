"""Where bf16 autocast differs from fp32 on CPU, per method: which modules run in bf16, and how far one
step's gradients move.

    OMP_NUM_THREADS=1 python benchmarks/precision_diag.py [--methods baseline,ffl,frskd,byot,mfkd] [--batch 64]

For each method, from one set of weights and one real-shaped batch (1x28x28, 10 classes, random pixels with a
fixed seed; a trained network is not needed to see the numerics): (1) the output dtypes of every Conv2d,
Linear, BatchNorm2d and of the loss terms under ``torch.autocast("cpu", torch.bfloat16)``; (2) the cosine
similarity between the fp32 gradient and the bf16-autocast gradient of each part of the method (the deployed
network, auxiliary modules), averaged over 3 batches.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import torch
from torch import nn

from fusionkd.data.datasets import DatasetInfo
from fusionkd.engine.config import Config
from fusionkd.engine.trainer import build_method


def teacher_file(tmp: str) -> str:
    """A fusionkd checkpoint of an untrained resnet32 teacher (its numerics, not its accuracy, matter)."""
    import fusionkd

    r = fusionkd.train(method="baseline", model="resnet32", dataset="synthetic", epochs=1, batch_size=16,
                       image_size=28, val_fraction=0.25, progress="none", threads=1, out_dir=tmp, name="t",
                       dataset_options={"num_classes": 10, "in_chans": 1, "train_size": 32, "test_size": 16},
                       overwrite=True)
    return str(r.run_dir / "best.pt")


def part_of(name: str) -> str:
    return name.split(".", 1)[0] if "." in name else name


def grads(method: nn.Module, images, labels, amp: bool) -> dict[str, torch.Tensor]:
    method.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        terms = method.training_step(images, labels, epoch=method.ctx.epochs - 1)
    sum(t.float() for t in terms.values()).backward()
    by_part: dict[str, list[torch.Tensor]] = defaultdict(list)
    for n, p in method.named_parameters():
        if p.grad is not None:
            by_part[part_of(n)].append(p.grad.detach().flatten().float())
    return {k: torch.cat(v) for k, v in by_part.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="baseline,ffl,frskd,byot,mfkd")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="/tmp/fusionkd-precision-diag")
    args = ap.parse_args()
    torch.manual_seed(0)
    from fusionkd.engine.checkpoint import load_checkpoint

    teacher = teacher_file(args.out)  # also gives the data description every method is built for
    info = DatasetInfo.from_dict(load_checkpoint(teacher)["data"])
    for name in args.methods.split(","):
        cfg = Config(method=name, model="resnet20", epochs=10)
        if name in ("kd", "fitnet", "at", "mfkd"):
            cfg.teacher = teacher
        method = build_method(cfg, info, torch.device("cpu")).to(memory_format=torch.channels_last)
        method.train()
        dtypes: dict[str, Counter] = defaultdict(Counter)

        def record(mod: nn.Module, _inputs, out, seen=dtypes) -> None:
            if torch.is_tensor(out):
                seen[type(mod).__name__].update([str(out.dtype).replace("torch.", "")])

        hooks = [m.register_forward_hook(record) for m in method.modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
        g = torch.Generator().manual_seed(1)
        images = torch.randn(args.batch, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (args.batch,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = method.training_step(images, labels, epoch=9)
        for h in hooks:
            h.remove()
        loss_dtypes = sorted({str(t.dtype).replace("torch.", "") for t in terms.values()})
        cos: dict[str, list[float]] = defaultdict(list)
        for b in range(3):
            gb = torch.Generator().manual_seed(10 + b)
            x = torch.randn(args.batch, 1, 28, 28, generator=gb).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (args.batch,), generator=gb)
            state = {k: v.clone() for k, v in method.state_dict().items()}
            g32 = grads(method, x, y, amp=False)
            method.load_state_dict(state)  # BN running stats moved: same start for the bf16 pass
            g16 = grads(method, x, y, amp=True)
            method.load_state_dict(state)
            for part in g32:
                if part in g16 and g32[part].norm() > 0:
                    cos[part].append(float(torch.nn.functional.cosine_similarity(g32[part], g16[part], dim=0)))
        kinds = ", ".join(f"{k} {dict(v)}" for k, v in sorted(dtypes.items()))
        parts = ", ".join(f"{p} {sum(v) / len(v):.3f}" for p, v in sorted(cos.items()))
        print(f"| {name} | {kinds} | {', '.join(loss_dtypes)} | {parts} |", flush=True)


if __name__ == "__main__":
    print("| method | module outputs under bf16 autocast (counts) | loss terms | grad cosine fp32 vs bf16, per part |")
    print("|---|---|---|---|")
    main()
