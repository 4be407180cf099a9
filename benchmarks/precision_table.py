"""Paired fp32-vs-bf16 table from two ``fusionkd compare`` folders run with the same seeds and settings.

    python benchmarks/precision_table.py runs/precision/fp32 runs/precision/bf16

For every (method, head that is deployed) it pairs the runs by seed and prints mean ± std of each arm (test
accuracy at the best-validation epoch and at the last epoch), the mean paired difference bf16 − fp32 with a
95 % t interval, and the mean training throughput of each arm. Reads only ``summary.json`` files.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def runs(folder: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for s in sorted(folder.glob("runs/*/*/s*/summary.json")):
        d = json.loads(s.read_text())
        if d.get("finished"):
            out[(d["method"], int(d["seed"]))] = d
    return out


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def interval(diffs: list[float]) -> str:
    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{m:+.2f}"
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"


def main(a: str, b: str) -> None:
    fp32, bf16 = runs(Path(a)), runs(Path(b))
    methods = sorted({m for m, _ in fp32} & {m for m, _ in bf16}, key=lambda m: (m != "baseline", m))
    print("| method | seeds | fp32 best-val | bf16 best-val | bf16 − fp32 (95 % CI) | fp32 last | bf16 last "
          "| bf16 − fp32 last | img/s fp32 | img/s bf16 | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        seeds = sorted({s for mm, s in fp32 if mm == m} & {s for mm, s in bf16 if mm == m})
        pairs = [(fp32[(m, s)], bf16[(m, s)]) for s in seeds]

        def best(d):
            return d["best"]["test"][d["deploy_head"]]

        def last(d):
            return d["last"]["test"][d["deploy_head"]]

        bx, by = [best(x) for x, _ in pairs], [best(y) for _, y in pairs]
        lx, ly = [last(x) for x, _ in pairs], [last(y) for _, y in pairs]
        sx = statistics.mean(x["img_per_s"] for x, _ in pairs)
        sy = statistics.mean(y["img_per_s"] for _, y in pairs)
        print(f"| {m} | {len(seeds)} | {ms(bx)} | {ms(by)} | {interval([y - x for x, y in zip(bx, by)])} | {ms(lx)} "
              f"| {ms(ly)} | {interval([y - x for x, y in zip(lx, ly)])} | {sx:,.0f} | {sy:,.0f} | {sy / sx:.2f}× |")
    some = next(iter(fp32.values()), None)
    if some:
        d = some["data"]
        print(f"\n{some['dataset']}, {d.get('subset')} training images (train {d['train']}, val {d['val']}, test "
              f"{d['test']}), {some['epochs']} epochs, {some['model']}; accuracies in % (test split); "
              f"hardware: {some['hardware'].get('cpu', some['hardware'])}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
