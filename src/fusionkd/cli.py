"""The ``fusionkd`` command. Every subcommand is a thin layer over :mod:`fusionkd.api`.

``fusionkd train`` accepts every config option both as ``--flag value`` (generated from the schema, so
the CLI and the YAML files can never disagree) and as trailing ``key=value`` overrides, including nested
ones (``augment.flip=false``, ``options.peers=3``).

**Stops.** Ctrl-C, ``SIGTERM`` and ``SIGHUP`` (what batch schedulers send on preemption or at the time
limit, and what a closed terminal sends) take the same path: :func:`main` turns the two signals into a
:class:`StopSignal` (a ``KeyboardInterrupt``) raised in the main thread, so the run keeps its last finished
epoch in ``last.pt``, its trackers end (MLflow: ``KILLED``), the run folder's lock is released and one
message says how to resume. Exit codes: 130 for Ctrl-C, 128 + the signal's number for a signal (143 for
``SIGTERM``, 129 for ``SIGHUP``), as a shell reports a process killed by it. A signal that was ignored when
the command started (``nohup`` ignores ``SIGHUP``) stays ignored; a second signal during the stop is ignored,
so that the stop can finish (``SIGKILL`` still ends the process at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from .engine.config import Config
from .engine.stops import STOP_SIGNALS, StopSignal, stop_signals_as_interrupts  # noqa: F401 - re-exported

log = logging.getLogger("fusionkd")

_SKIP_FLAGS = {"options", "augment", "dataset_options"}


def _stop_message(e: KeyboardInterrupt) -> str:
    """What a stopped ``train`` says: what is kept and the command that continues it."""
    how = f"stopped by {signal.Signals(e.signum).name}" if isinstance(e, StopSignal) else "interrupted"
    run_dir = getattr(e, "run_dir", None)
    if run_dir is None:
        return f"{how}; the last finished epoch is in last.pt (resume with --resume RUN_DIR)"
    if (Path(run_dir) / "last.pt").is_file():
        return f"{how}; the last finished epoch is in {Path(run_dir) / 'last.pt'}: resume with `fusionkd train " \
               f"--resume {run_dir}`"
    return f"{how} before the first epoch finished; `fusionkd train --resume {run_dir}` starts it again"


def _schema_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add ``--<option>`` for every top-level scalar/list field of :class:`Config` that the subcommand does not
    define itself (``compare --dataset``, ``bench --precision`` keep their own meaning); returns the names.

    Every subcommand that trains (train, compare, tune, bench, demo) calls it, so the config's options are one
    language across them: ``--key value`` and ``key=value``, with the same refusals and did-you-mean."""
    hints = typing.get_type_hints(Config)
    names = []
    group = parser.add_argument_group("config options (also accepted as key=value; see docs/config.md)")
    for f in dataclasses.fields(Config):
        if f.name in _SKIP_FLAGS:
            continue
        tp = hints[f.name]
        is_list = "list" in str(tp)
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f"(default: {default})" + (" comma-separated list" if is_list else "")
        try:
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                               metavar=f.name.upper(), help=helptext)
        except argparse.ArgumentError:  # the subcommand has its own --flag of that name
            continue
        names.append(f.name)
    parser.set_defaults(config_flags=names)
    return names


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The config ``--flags`` given to a subcommand other than ``train``, as ``key=value`` items (put before
    the command's own ``key=value`` items, which win, as in ``train``)."""
    out = []
    for name in getattr(args, "config_flags", None) or []:
        raw = getattr(args, f"cfg_{name}", None)
        if raw is not None:
            out.append(f"{name}={json.dumps(_parse_flag_value(name, raw))}")
    return out


def _parse_flag_value(name: str, raw: str) -> Any:
    from .engine.config import read_value

    tp = str(typing.get_type_hints(Config)[name])
    if "list" in tp and not raw.strip().startswith("["):
        items = [s.strip() for s in raw.split(",") if s.strip()]
        return [read_value(s) if "int" in tp else s for s in items]
    if tp.startswith("<class 'str'>") or tp == "str" or tp.startswith("str |"):
        return raw
    return read_value(raw)


def _collect_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        raw = getattr(args, f"cfg_{name}")
        if raw is not None:
            out[name] = _parse_flag_value(name, raw)
    return out


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _result_table(summary: dict[str, Any]) -> str:
    best, last = summary.get("best") or {}, summary.get("last") or {}
    head = summary["deploy_head"]
    rows = [f"{'head':<14} {'best-val epoch: val':>20} {'test':>8}   {'last epoch: test':>16}"]
    for h in sorted(last.get("test") or {}, key=lambda x: (x != head, x)):
        mark = " *" if h == head else ""
        bv = (best.get("val") or {}).get(h)
        bt = (best.get("test") or {}).get(h)
        rows.append(f"{h + mark:<14} {_pct(bv):>20} {_pct(bt):>8}   {last['test'][h]:>16.2f}")
    return "\n".join([
        f"{summary['method']} / {summary['model']} on {summary['dataset']}: {summary['epochs']} epochs, "
        f"seed {summary['seed']}, data {summary['data']['train']} train / {summary['data']['val']} val / "
        f"{summary['data']['test']} test",
        *rows,
        f"(* deploy head; best epoch {best.get('epoch')} chosen by {best.get('selection', 'val')} accuracy; "
        f"accuracies in %; {summary['train_time_s']:.0f}s training at {summary['img_per_s']:,.0f} img/s"
        + (f" + {summary['eval_time_s']:.0f}s evaluation" if summary.get("eval_time_s") is not None else "") + ")",
        f"run folder: {summary['run_dir']}",
    ])


# ---------------------------------------------------------------------- subcommands
def cmd_train(args: argparse.Namespace, names: list[str]) -> int:
    from . import api
    from .engine.config import resolve_config

    flags = _collect_overrides(args, names)
    if getattr(args, "plugin", None):  # --plugin FILE, repeatable, adds to plugins=[...]
        flags["plugins"] = [*(flags.get("plugins") or []), *args.plugin]
    run_dir: Path | None = None
    try:
        if args.resume:
            from .plugins import importing_for

            run_dir = Path(args.resume)
            kv = dict(_kv(o) for o in args.overrides)
            with importing_for(f"resuming {args.resume}"):  # its plug-in files are named before they run
                result = api.resume(args.resume, stop_after=args.stop_after, **{**flags, **kv})
        else:
            cfg = resolve_config(flags, config_file=args.config, overrides=args.overrides)
            if args.print_config:
                print(_resolved_yaml(cfg), end="")
                return 0
            from .engine.trainer import Trainer

            trainer = Trainer(cfg, overwrite=args.overwrite)
            run_dir = trainer.run_dir
            trainer.stop_after = args.stop_after
            result = trainer.fit()
    except KeyboardInterrupt as e:
        e.run_dir = run_dir  # type: ignore[attr-defined]  # for the message of main()
        raise
    if result.summary.get("finished"):
        print(_result_table(result.summary))
    # a stop after --stop-after was already said once, by the trainer's log line
    return 0


def _resolved_yaml(cfg) -> str:
    """The config as YAML with the method's options resolved to their defaults (display only: the run's
    ``config.yaml`` keeps what was given, so that a later change of a default is visible as such)."""
    import dataclasses

    from .engine.config import build_options
    from .methods import METHODS

    opts = build_options(METHODS.get(cfg.method), cfg.options, cfg.method)
    d = cfg.to_dict()
    if dataclasses.is_dataclass(opts):
        d["options"] = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _kv(text: str) -> tuple[str, Any]:
    from .engine.config import parse_override

    return parse_override(text)


def cmd_eval(args: argparse.Namespace) -> int:
    from . import api

    r = api.evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                                device=args.device, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['checkpoint']} on {r['dataset']} {r['split']} ({r['images']} images)")
    for h, a in r["accuracy"].items():
        print(f"  {h + (' *' if h == r['deploy_head'] else ''):<14} {a:6.2f} %")
    print(f"per-class accuracy of the deploy head ({r['deploy_head']}):")
    for c, a in r["per_class_accuracy"].items():
        print(f"  {c:<20} {a:6.2f} %")
    print("confusion matrix (rows: true class, columns: predicted class; class numbers as in the list on the "
          "right):")
    width = max(5, max(len(str(v)) for row in r["confusion_matrix"] for v in row) + 1)
    print("  " + "true" + "".join(f"{j:>{width}}" for j in range(len(r["classes"]))))
    for i, row in enumerate(r["confusion_matrix"]):
        print(f"  {i:>3} " + "".join(f"{v:>{width}}" for v in row) + f"   {r['classes'][i]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api

    w = api.export_checkpoint(args.checkpoint, args.out, onnx=args.onnx)
    for k, v in w.items():
        print(f"{k:<12} {v}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import api

    for r in api.predict(args.checkpoint, args.images, topk=args.topk):
        tops = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
        print(f"{r['image']}: {tops}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import api
    from .plugins import load_files

    load_files(args.plugin or [])
    reg = api.list_registered()
    if args.json:
        print(json.dumps(reg, indent=2))
        return 0
    for section in ("methods", "models", "datasets"):
        print(f"{section}:")
        for e in sorted(reg[section], key=lambda e: e["name"]):
            fam = f"[{e['family']}] " if e.get("family") else ""
            origin = "" if e["source"] == "fusionkd" else f"  (from {e['source']})"
            print(f"  {e['name']:<16} {fam}{e['description']}{origin}")
    for err in reg["plugin_errors"]:
        print(f"plug-in {err['name']} ({err['group']}) failed to load: {err['error']}")
    print("presets (--config NAME; options given on the command line override them):")
    for e in reg["presets"]:
        print(f"  {e['name']:<22} {e['description']}\n  {'':<22} source: {e['source']}")
    print("tables (fusionkd compare --table NAME [--size cpu]; docs/compare.md):")
    for e in reg["tables"]:
        print(f"  {e['name']:<28} {e['title']}")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    p = argparse.ArgumentParser(prog="fusionkd", description="Feature-fusion knowledge distillation.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method (or resume a run)",
                       description="Train a method. Options: --flag value or key=value (nested: augment.flip=false, "
                                   "options.NAME=VALUE for the method's own options).")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--config", help="YAML file of options")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    t.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    t.add_argument("--stop-after", type=int, metavar="N", help="train at most N epochs now (resumable)")
    t.add_argument("--plugin", action="append", metavar="FILE.py",
                   help="a local file registering methods/models/datasets (repeatable; adds to plugins=)")
    names = _schema_flags(t)

    e = sub.add_parser("eval", help="accuracy per head, per-class accuracy, confusion matrix")
    e.add_argument("checkpoint", help="best.pt / last.pt / run folder / exported .pt")
    e.add_argument("--dataset", help="evaluate on another dataset with the same classes")
    e.add_argument("--data-dir")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--json", action="store_true", help="print JSON")

    x = sub.add_parser("export", help="export the deploy network (torch.export .pt2 + state_dict + metadata)")
    x.add_argument("checkpoint")
    x.add_argument("--out", required=True, help="output .pt2 path (the .pt/.json/.onnx files go beside it)")
    x.add_argument("--onnx", action="store_true", help="also write ONNX (needs the onnx package)")

    pr = sub.add_parser("predict", help="classify image files with a checkpoint's deploy network")
    pr.add_argument("checkpoint")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--topk", type=int, default=3)

    ls = sub.add_parser("list", help="methods, models and datasets")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--plugin", action="append", metavar="FILE.py", help="also load this plug-in file")
    _add_extra_commands(sub)
    return p, names


def _add_extra_commands(sub) -> None:
    """Subcommands contributed by other modules (compare, report, bench, demo) when present."""
    try:
        from . import commands
    except ImportError:
        return
    commands.add_parsers(sub)
    for name in ("compare", "tune", "bench", "demo"):  # the config's --flags, as train has them
        _schema_flags(sub.choices[name])
    for parser in sub.choices.values():
        # no prefix matching: `--plugin` must never silently mean `--plugins` (each repetition replacing the
        # last), nor `--model` `--models`; a misspelt flag is refused with the usage instead
        parser.allow_abbrev = False


def main(argv: list[str] | None = None) -> int:
    parser, names = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value may come anywhere, also after a --flag (argparse stops filling the positional list there)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # the usual "unrecognized arguments" error, with usage
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    if args.command != "train" and getattr(args, "config_flags", None):
        args.overrides = [*flag_overrides(args), *(args.overrides or [])]
    _setup_logging(args.verbose)
    with stop_signals_as_interrupts() as received:
        code = _dispatch(args, names)
    if received and code == 130:  # a command that caught the stop itself (compare, tune, demo) said 130
        code = 128 + received[0]
    return code


def _dispatch(args: argparse.Namespace, names: list[str]) -> int:
    """Run the subcommand; a refusal is one line and exit code 2, a stop (Ctrl-C, SIGTERM, SIGHUP) a
    message saying how to continue and exit code 130 (Ctrl-C) or 128 + the signal's number."""
    from .errors import FusionKDError

    try:
        if args.command == "train":
            return cmd_train(args, names)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "list":
            return cmd_list(args)
        return args.func(args)
    # every refusal fusionkd makes (the root of fusionkd.errors), and the builtin errors a library below raises
    # for bad input (a value torch or PIL refuses, a file that is not there or not readable)
    except (FusionKDError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"fusionkd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("\n" + _stop_message(e), file=sys.stderr)
        return 128 + e.signum if isinstance(e, StopSignal) else 130


if __name__ == "__main__":
    raise SystemExit(main())
