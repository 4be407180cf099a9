"""Where does a fusion method's auxiliary head beat its deployed network, and why? (docs/methods/gap.md)

For each finished run folder (FRSKD: ``net`` vs its self-teacher ``teacher``; FFL: a sub-network vs the
``fused`` head) this reads ``last.pt`` and measures, on the **validation** split (the test split is shown
for information, never used for a choice):

* each head's accuracy, how often the two heads agree, and ``KL(aux || net)`` at T = 1 (how far the
  deployed network is from the head it is taught by);
* on the images where exactly one of the two is right, which one it is;
* linear probes (multinomial logistic regression, full batch, L-BFGS, on standardised features of the
  run's own training images without augmentation; the L2 weight is chosen on validation from 1e-4/1e-3/1e-2):
  ``last``: the deployed network's pooled last map (what its own classifier reads: a refit of its FC);
  ``all``: the pooled maps of every stage (FRSKD: what the self-teacher reads) or of every peer (FFL:
  what the fusion module reads), concatenated.
  If ``all`` beats ``last`` by about the aux-vs-net gap, the auxiliary head's advantage is information that
  lies in its wider input and that the deployed network's single linear readout does not reach.

    OMP_NUM_THREADS=1 python experiments/gap_probe.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

One line per run and a mean over runs; ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fusionkd.data import load_dataset, make_loader
from fusionkd.engine.checkpoint import load_checkpoint, load_weights_strict
from fusionkd.engine.config import Config, build_dataclass
from fusionkd.engine.normalize import apply_normalize
from fusionkd.engine.trainer import build_method


def gap(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x.float(), 1), 1)


@torch.no_grad()
def collect(method, loader, kind: str):
    """Logits of the deployed and the auxiliary head, the ``last`` and ``all`` features, the labels."""
    out = {"net": [], "aux": [], "last": [], "all": [], "y": []}
    for x, y in loader:
        if kind == "frskd":
            o = method.forward_all(x)
            net, aux = o.logits, o.teacher_logits
            last = method.net.head.pooled(o.maps[-1])
            every = torch.cat([gap(m) for m in o.maps], dim=1)
        else:  # ffl / mfef: the deployed peer vs the fused head
            heads = method.eval_logits(x)
            peer = method.deploy_head
            net, aux = heads[peer], heads["fused"]
            members = method.peers.members
            lasts = [m.forward_stages(x)[-1] for m in members]
            last = gap(lasts[int(method.best_peer)])
            every = torch.cat([gap(m) for m in lasts], dim=1)
        for k, v in (("net", net), ("aux", aux), ("last", last), ("all", every), ("y", y)):
            out[k].append(v.float() if k != "y" else v)
    return {k: torch.cat(v) for k, v in out.items()}


def probe(train_x, train_y, evals: dict, classes: int) -> dict[str, float]:
    """Logistic regression on standardised features; L2 weight chosen on ``evals['val']``."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)

    def z(t):
        return (t - mu) / sd

    best = None
    for l2 in (1e-4, 1e-3, 1e-2):
        torch.manual_seed(0)
        w = torch.zeros(train_x.shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")
        xt = z(train_x)

        def closure(opt=opt, w=w, b=b, xt=xt, l2=l2):
            opt.zero_grad()
            loss = F.cross_entropy(xt @ w + b, train_y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = {s: 100.0 * float(((z(x) @ w + b).argmax(1) == y).float().mean()) for s, (x, y) in evals.items()}
        if best is None or acc["val"] > best["val"]:
            best = {**acc, "l2": l2}
    return best


def analyse(run: Path) -> dict:
    ckpt = load_checkpoint(run / "last.pt")
    cfg: Config = build_dataclass(Config, dict(ckpt["config"]))
    kind = "frskd" if cfg.method == "frskd" else "ffl" if cfg.method in ("ffl", "mfef") else None
    if kind is None:
        raise SystemExit(f"{run}: method {cfg.method!r} has no auxiliary head studied here (frskd, ffl, mfef)")
    torch.manual_seed(0)
    splits = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, subset=cfg.subset,
                          seed=cfg.data_seed, image_size=cfg.image_size, **cfg.dataset_options)
    splits = apply_normalize(splits, cfg.normalize)
    info = splits.info
    dev = torch.device("cpu")
    method = build_method(cfg, info, dev)
    load_weights_strict(method, ckpt["method_state"], f"{cfg.method} on {cfg.model}")
    method.eval()
    data = {s: collect(method, make_loader(getattr(splits, s), info, batch_size=500, train=False, device=dev), kind)
            for s in ("train", "val", "test")}
    res: dict = {"run": str(run), "method": cfg.method, "model": cfg.model, "seed": cfg.seed, "epochs": cfg.epochs}
    for s in ("val", "test"):
        d = data[s]
        pn, pa = d["net"].argmax(1), d["aux"].argmax(1)
        right_n, right_a = pn == d["y"], pa == d["y"]
        only_a, only_n = int((right_a & ~right_n).sum()), int((right_n & ~right_a).sum())
        kl = F.kl_div(F.log_softmax(d["net"], 1), F.log_softmax(d["aux"], 1), reduction="batchmean",
                      log_target=True)
        res[s] = {"net": 100.0 * float(right_n.float().mean()), "aux": 100.0 * float(right_a.float().mean()),
                  "agree": 100.0 * float((pn == pa).float().mean()), "kl_aux_net": float(kl),
                  "only_aux_right": only_a, "only_net_right": only_n}
    evals = {s: (data[s]["last"], data[s]["y"]) for s in ("val", "test")}
    res["probe_last"] = probe(data["train"]["last"], data["train"]["y"], evals, len(info.classes))
    evals = {s: (data[s]["all"], data[s]["y"]) for s in ("val", "test")}
    res["probe_all"] = probe(data["train"]["all"], data["train"]["y"], evals, len(info.classes))
    res["features"] = {"last": int(data["train"]["last"].shape[1]), "all": int(data["train"]["all"].shape[1])}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [analyse(r) for r in args.runs]
    head = (f"{'run':44} {'val net':>8} {'val aux':>8} {'agree':>6} {'KL':>6} {'aux-only':>8} {'net-only':>8} "
            f"{'probe last':>10} {'probe all':>9}")
    print(head)
    for r in rows:
        v = r["val"]
        print(f"{r['run'][-44:]:44} {v['net']:8.2f} {v['aux']:8.2f} {v['agree']:6.2f} {v['kl_aux_net']:6.3f} "
              f"{v['only_aux_right']:8d} {v['only_net_right']:8d} {r['probe_last']['val']:10.2f} "
              f"{r['probe_all']['val']:9.2f}")
    if len(rows) > 1:
        def m(f):
            return statistics.mean(f(r) for r in rows)
        print(f"{'mean of ' + str(len(rows)) + ' runs':44} {m(lambda r: r['val']['net']):8.2f} "
              f"{m(lambda r: r['val']['aux']):8.2f} {m(lambda r: r['val']['agree']):6.2f} "
              f"{m(lambda r: r['val']['kl_aux_net']):6.3f} {m(lambda r: r['val']['only_aux_right']):8.1f} "
              f"{m(lambda r: r['val']['only_net_right']):8.1f} {m(lambda r: r['probe_last']['val']):10.2f} "
              f"{m(lambda r: r['probe_all']['val']):9.2f}")
    print("validation split; test split (information only) in --json")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
