"""The ``compare``, ``report``, ``bench``, ``demo`` and ``tune`` subcommands of the ``fusionkd`` CLI.

``fusionkd.cli`` calls :func:`add_parsers`; each subcommand's ``func(args) -> exit code`` is a thin layer
over :mod:`fusionkd.compare`. Bad arguments raise ConfigError/ValueError, which the CLI turns into
``fusionkd <command>: error: ...`` and exit code 2. See ``docs/compare.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .engine.config import ConfigError, parse_override


def _say(line: str) -> None:
    print(line, flush=True)


def _csv(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _split_method_options(items: list[str] | None) -> tuple[list[str], list[str]]:
    """``--method-options`` takes several values, so trailing ``key=value`` options land in it too:
    hand back ``(METHOD:KEY=VALUE items, plain key=value items)``."""
    method_items, plain = [], []
    for item in items or []:
        head = item.split(":", 1)[0]
        (method_items if ":" in item and "=" not in head else plain).append(item)
    return method_items, plain


# ---------------------------------------------------------------------- prepare
class _Bar:
    """``progress(done, total)`` as a bar on a terminal, else a line per ~10 %."""

    def __init__(self, label: str) -> None:
        import time

        self.label, self.t0, self.last, self.tty = label, time.perf_counter(), -1, sys.stderr.isatty()
        self._time = time.perf_counter

    def __call__(self, done: int, total: int) -> None:
        elapsed = self._time() - self.t0
        rate = done / max(elapsed, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        frac = done / max(total, 1)
        text = f"{self.label} {done:,}/{total:,} ({rate:,.0f}/s, ETA {eta:,.0f}s)"
        if self.tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {text}" + ("\n" if done >= total else ""))
            sys.stderr.flush()
        elif int(frac * 10) > self.last or done >= total:
            self.last = int(frac * 10)
            print(text, file=sys.stderr, flush=True)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare_dataset

    opts = dict(parse_override(o) for o in args.overrides)
    data_dir = opts.pop("data_dir", args.data_dir)
    image_size = opts.pop("image_size", args.image_size)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4):
        raise ConfigError(f"image_size must be an int >= 4, got {image_size!r}")
    store = prepare_dataset(args.dataset, data_dir, image_size=image_size, cache_dir=args.cache_dir,
                            progress=_Bar("images"), **opts)
    if args.verify:
        store.verify(_Bar("shards verified"))
    m = store.manifest
    counts = {s: sum(e["count"] for e in es) for s, es in m["shards"].items()}
    size = sum(counts.values()) * store.image_bytes
    _say(f"store {store.root}")
    _say(f"  {args.dataset}: " + ", ".join(f"{s} {n:,}" for s, n in counts.items())
         + f" images at {store.resolution} px, {len(store.classes)} classes, {size / 1e9:.2f} GB"
         + (" (verified)" if args.verify else ""))
    return 0


# ---------------------------------------------------------------------- compare
def _compare_command(args: argparse.Namespace) -> str:
    """The canonical command line of a comparison (recorded in compare.json and report.md)."""
    parts = ["fusionkd", "compare", "--methods", args.methods, "--models", args.models, "--seeds", args.seeds]
    for flag, value in (("--dataset", args.dataset), ("--epochs", args.epochs), ("--subset", args.subset),
                        ("--out", args.out), ("--config", args.config),
                        ("--teacher-model", args.teacher_model), ("--teacher-epochs", args.teacher_epochs)):
        if value is not None:
            parts += [flag, str(value)]
    for item in args.method_options or []:
        parts += ["--method-options", item]
    return shlex.join(parts + list(args.overrides))


def _plugins(args: argparse.Namespace, common: dict) -> None:
    """Load ``--plugin`` files (and ``plugins=[...]``) before any name is looked up; every run gets them."""
    from .plugins import load_files

    files = list(args.plugin or []) + list(common.get("plugins") or [])
    if files:
        common["plugins"] = load_files(files)


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare.grid import CompareSpec, compare, parse_method_options, parse_names, parse_seeds
    from .compare.report import by_table
    from .compare.terminal import compact_table

    early = dict(parse_override(o) for o in args.overrides if o.startswith("plugins="))
    _plugins(args, early)
    if early.get("plugins"):
        args.overrides = [o for o in args.overrides if not o.startswith("plugins=")]
        args.overrides.append("plugins=" + json.dumps(early["plugins"]))
    if args.table:
        return _compare_table(args)
    if args.teachers_dir or args.size or args.columns:
        raise ConfigError("--teachers-dir, --size and --columns belong to --table NAME (a published table)")
    if not args.methods:
        raise ConfigError("give --methods (comma-separated, e.g. baseline,kd) or --table NAME (fusionkd list)")
    args.seeds = args.seeds or "0"
    methods = parse_names(args.methods, "method")
    models = parse_names(args.models, "model")
    seeds = parse_seeds(args.seeds)
    args.method_options, stray = _split_method_options(args.method_options)
    args.overrides = list(args.overrides) + stray
    common = dict(parse_override(o) for o in args.overrides)
    for key in ("dataset", "epochs", "subset"):
        value = getattr(args, key)
        if value is None:
            continue
        if key in common and common[key] != value:
            raise ConfigError(f"--{key} {value} and {key}={common[key]} disagree; give one")
        common[key] = value
    devices = _csv(args.devices) or None
    workers = args.workers if args.workers is not None else (len(devices) if devices else 1)
    spec = CompareSpec(
        methods=methods, models=models, seeds=seeds, out=Path(args.out), common=common,
        method_options=parse_method_options(args.method_options or [], methods), config_file=args.config,
        teacher_model=args.teacher_model, teacher_epochs=args.teacher_epochs, workers=workers,
        threads=args.threads, devices=devices, rerun_changed=args.rerun_changed,
        command=_compare_command(args),
    )
    try:
        result = compare(spec, report=_say)
    except KeyboardInterrupt:
        print("\ninterrupted; finished runs are kept and interrupted ones resume from their last epoch: run "
              f"the same command again (results so far: fusionkd report {args.out})", file=sys.stderr)
        return 130
    for (dataset, model), groups in by_table(result.report.groups).items():
        print(f"\n{model} on {dataset}: deploy head's test accuracy %, mean ± std over seeds "
              "(the full table is in report.md):")
        print(compact_table(groups))
    print("\n" + _written(result.report))
    if result.failures:
        failed = "; ".join(f.label for f in result.failures)
        print(f"{len(result.failures)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _compare_table(args: argparse.Namespace) -> int:
    """``fusionkd compare --table NAME``: a published table, teachers first, one grid per column."""
    from .compare.planning import parse_seeds
    from .compare.tables import TableRun, load_table, render_markdown, run_table
    from .errors import RunsFailedError

    given = [f for f, v in (("--methods", args.methods), ("--method-options", args.method_options),
                            ("--teacher-model", args.teacher_model), ("--config", args.config)) if v]
    if given or args.models != "resnet20":
        raise ConfigError(f"--table {args.table} sets the methods, networks and settings itself; "
                          f"drop {', '.join(given) or '--models'} (options go on top as key=value)")
    table = load_table(args.table)
    overrides = dict(parse_override(o) for o in args.overrides)
    for key in ("dataset", "epochs", "subset"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    devices = _csv(args.devices) or None
    out = Path(args.out if args.out != "runs/compare" else f"runs/tables/{table.name}")
    run = TableRun(table=table, out=out, seeds=parse_seeds(args.seeds) if args.seeds else None,
                   size=args.size or "full", overrides=overrides, teacher_epochs=args.teacher_epochs,
                   teachers_dir=Path(args.teachers_dir) if args.teachers_dir else None,
                   workers=args.workers if args.workers is not None else (len(devices) if devices else 1),
                   threads=args.threads, devices=devices, rerun_changed=args.rerun_changed,
                   command=shlex.join(["fusionkd", "compare", *sys.argv[2:]]), columns=_csv(args.columns) or None)
    try:
        result = run_table(run, say=_say)
    except RunsFailedError as e:  # not a usage error: runs failed (exit 1, as a comparison with failed runs)
        print(f"fusionkd compare: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to finish the table in {out}", file=sys.stderr)
        return 130
    print("\n" + render_markdown(result).split("\n## ", 1)[0])
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'} and {out / 'table.json'}")
    return 1 if result["failures"] else 0


# ---------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from .compare.report import report_from_folders

    files = report_from_folders(args.paths, args.out, plots=not args.no_plots)
    n = sum(len(g.seeds) for g in files.groups)
    print(f"{n} run(s) in {len(files.groups)} group(s): " + _written(files))
    return 0


def _written(files) -> str:
    plots = f" and {len(files.plots)} plot(s)" if files.plots else ""
    skipped = f" (plots skipped: {files.plots_skipped})" if files.plots_skipped else ""
    return f"wrote {files.csv}, {files.markdown}{plots}{skipped}"


# ---------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from .compare.bench import BenchSpec, bench, format_table, parse_shape, run_data_benchmark
    from .compare.grid import parse_method_options, parse_names
    from .methods import METHODS

    if args.data:
        return run_data_benchmark(shlex.split(args.data_args or ""))
    methods = parse_names(args.methods, "method") if args.methods else METHODS.names()
    common = dict(parse_override(o) for o in args.overrides or [])
    spec = BenchSpec(
        methods=methods, models=parse_names(args.models, "model"), dataset=args.dataset,
        shape=parse_shape(args.shape) if args.shape else None, num_classes=args.num_classes,
        batch_size=args.batch_size, precision=args.precision, channels_last=args.channels_last,
        compile=args.compile, threads=args.threads, device=args.device, warmup=args.warmup,
        repeats=args.repeats, steps=args.steps, teacher_model=args.teacher_model,
        method_options=parse_method_options(args.method_options or [], ["baseline", *methods]), common=common,
    )
    out = bench(spec, report=None if args.quiet else _say)
    print(format_table(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in out["results"]) else 0


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .compare.demo import demo, demo_table

    if args.epochs < 1 or args.subset < 10:
        raise ConfigError("--epochs must be >= 1 and --subset >= 10")
    try:
        res = demo(args.out, epochs=args.epochs, subset=args.subset, precision=args.precision,
                   workers=args.workers, threads=args.threads, report=_say,
                   common=dict(parse_override(o) for o in args.overrides or []))
    except KeyboardInterrupt:
        print("\ninterrupted; run `fusionkd demo` again with the same options to finish it", file=sys.stderr)
        return 130
    if res.missing:
        print(f"note: {', '.join(res.missing)} not registered here; "
              f"the demo compares {', '.join(res.methods)}")
    print()
    print(demo_table(res))
    return 1 if res.result.failures else 0


# ---------------------------------------------------------------------- tune
def _tune_command(args: argparse.Namespace, space: list[str], overrides: list[str]) -> str:
    """The canonical command line of a study (recorded in tune.md)."""
    parts = ["fusionkd", "tune", "--method", args.method, "--space", *space, "--trials", str(args.trials),
             "--out", args.out]
    for flag, value in (("--space-file", args.space_file), ("--storage", args.storage),
                        ("--study-name", args.study_name), ("--config", args.config),
                        ("--sampler", args.sampler if args.sampler != "tpe" else None),
                        ("--pruner", args.pruner if args.pruner != "median" else None),
                        ("--confirm-seeds", args.confirm_seeds)):
        if value is not None:
            parts += [flag, str(value)]
    if args.confirm_options:
        parts += ["--confirm-options", *args.confirm_options]
    return shlex.join(parts + overrides)


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tune as T
    from .compare.grid import parse_names, parse_seeds

    plugin_common: dict = {}
    _plugins(args, plugin_common)
    method = parse_names(args.method, "method")[0]
    space_items, stray = [], []
    for item in args.space or []:  # --space takes several values, so trailing key=value land in it too
        head = item.split("=", 1)[0]
        is_dist = "=" in item and item.split("=", 1)[1].split(":", 1)[0] in T.KINDS
        (space_items if is_dist or ":" in head else stray).append(item)
    overrides = list(args.overrides) + stray
    if plugin_common:
        overrides.append("plugins=" + json.dumps(plugin_common["plugins"]))
    spec = T.TuneSpec(
        method=method, space=T.parse_space(space_items, method, args.space_file), out=Path(args.out),
        trials=args.trials, storage=args.storage, study_name=args.study_name, sampler=args.sampler,
        pruner=args.pruner, sampler_seed=args.sampler_seed, prune_startup=args.prune_startup,
        prune_warmup=args.prune_warmup, common=T.parse_common(overrides), config_file=args.config,
        confirm_seeds=parse_seeds(args.confirm_seeds) if args.confirm_seeds else [],
        confirm_options=T.parse_common(args.confirm_options or []),
        confirm_workers=args.confirm_workers, command=_tune_command(args, space_items, overrides),
    )
    try:
        study = T.run_study(spec, report=_say)
    except KeyboardInterrupt:
        print("\ninterrupted; the study is kept in its storage: run the same command again to continue it",
              file=sys.stderr)
        return 130
    paths = T.write_best(spec, study)
    best = T.best_settings(spec, study)
    _say(f"best: trial {best['trial']}, val {best['val']:.2f} %: {T.format_params(best['values'])}")
    _say(f"wrote {paths['train']} (fusionkd train --config) and {paths['compare']} (fusionkd compare --config)")
    confirmation = None
    if spec.confirm_seeds:
        confirmation = T.confirm(spec, study, report=_say)
        for pair, v in confirmation["verdicts"].items():
            _say(f"{pair}: " + "; ".join(f"{m} {x.format()}" for m, x in v.items() if x is not None))
    _say(f"wrote {T.write_markdown(spec, study, confirmation)}")
    return 0


# ---------------------------------------------------------------------- parsers
def add_parsers(sub) -> None:
    """Add ``compare``, ``report``, ``bench``, ``demo`` and ``prepare`` to the ``fusionkd`` subparsers ``sub``."""
    from .compare.demo import DEMO_EPOCHS, DEMO_SUBSET

    pp = sub.add_parser(
        "prepare", help="decode a dataset once into a store for training from disk (resumable)",
        description="Decode the images of a dataset once into a store of raw uint8 shards at a fixed resolution "
                    "(in parallel, resumable after any interruption, with a checksummed manifest), which training "
                    "then reads batch by batch. Trailing key=value: data_dir, image_size and the dataset's options "
                    "(store_dir, store_size, crop, workers). See docs/data.md.")
    pp.add_argument("overrides", nargs="*", metavar="key=value", help="data_dir=, image_size=, dataset options")
    pp.add_argument("--dataset", required=True, help="tinyimagenet, cub200, imagenet or imagefolder")
    pp.add_argument("--data-dir", help="the dataset folder (as data_dir=)")
    pp.add_argument("--image-size", type=int, help="side of the batches training will use (as image_size=)")
    pp.add_argument("--cache-dir", help="where the store goes when store_dir is not given")
    pp.add_argument("--verify", action="store_true", help="re-hash every shard against the manifest")
    pp.set_defaults(func=cmd_prepare)

    c = sub.add_parser(
        "compare", help="run a method x model x seed grid and report mean ± std (resumable)",
        description="Train every method x model x seed (each in OUT/runs/<model>/<method>/s<seed>), "
                    "skipping finished runs and resuming interrupted ones, then write OUT/results.csv, "
                    "OUT/report.md and plots. Trailing key=value options apply to every run (e.g. epochs=20 "
                    "subset=5000 schedule=cosine precision=bf16 channels_last=true). See docs/compare.md.")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config options of every run")
    c.add_argument("--methods", help="comma-separated registered methods (fusionkd list); METHOD@VARIANT is a "
                                     "row of its own, e.g. kd,kd@ls --method-options kd@ls:logit_std=true")
    c.add_argument("--table", help="run a published table (fusionkd list): its methods x network pairs x seeds, "
                                   "teachers first, beside the published numbers (OUT/table.md)")
    c.add_argument("--size", choices=["full", "cpu"],
                   help="with --table: full = the published recipe (default), cpu = the table's CPU size")
    c.add_argument("--columns", help="with --table: run only these columns, e.g. resnet56-resnet20,vgg13-vgg8 "
                                     "(table.md still lists every column)")
    c.add_argument("--teachers-dir", help="with --table: a folder of community teacher files "
                                          "(<teacher>_vanilla/ckpt_epoch_240.pth, RepDistiller/mdistiller)")
    c.add_argument("--models", default="resnet20", help="comma-separated zoo models (default: resnet20)")
    c.add_argument("--dataset", help="dataset of every run (default: the config default, fashion-mnist)")
    c.add_argument("--epochs", type=int, help="epochs of every run (same as epochs=N)")
    c.add_argument("--subset", type=int, help="training images of every run (same as subset=N)")
    c.add_argument("--seeds", help="seeds, e.g. 0,1,2 or 0-4 (default: 0; a --table: its own)")
    c.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    c.add_argument("--config", help="YAML file of options common to every run (key=value wins over it)")
    c.add_argument("--workers", type=int,
                   help="runs at once, each in its own process (default: 1, or the number of --devices)")
    c.add_argument("--threads", type=int, help="CPU threads per worker (default: cpu count // workers)")
    c.add_argument("--devices",
                   help="comma-separated devices given to the workers round-robin, e.g. cuda:0,cuda:1")
    c.add_argument("--teacher-model", help="train a baseline teacher of this model once (OUT/teachers/) for "
                                           "the offline methods; or give teacher=PATH")
    c.add_argument("--teacher-epochs", type=int, help="epochs of that teacher (default: the runs' epochs)")
    c.add_argument("--method-options", nargs="+", action="extend", metavar="METHOD:KEY=VALUE",
                   help="options of one method, e.g. ffl:peers=3 frskd:alpha=3 (a config key such as "
                        "ffl:lr=0.05 also works)")
    c.add_argument("--rerun-changed", action="store_true",
                   help="replace runs made with other settings (default: stop and list the differences)")
    c.add_argument("--plugin", action="append", metavar="FILE.py",
                   help="a local file registering methods/models/datasets (every run loads it)")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="rebuild results.csv, report.md and plots from run folders",
                       description="Collect every finished run (folder with summary.json) under the "
                                   "given folders (recursively; teachers/ folders are skipped) and write "
                                   "results.csv, report.md and plots.")
    r.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_COMPARE_DIR")
    r.add_argument("--out", help="where to write (default: the folder given, when only one)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="training throughput and peak memory of methods x models on this device",
                       description="Measure training steps of each method x model (baseline included, for "
                                   "the ratio) in a fresh process each: warm-up, then the median of several "
                                   "timed blocks. --data runs the data-pipeline benchmark instead.")
    b.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config options of every measured run (e.g. lr=0.1 augment.cutout=8)")
    b.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    b.add_argument("--models", default="resnet20")
    b.add_argument("--dataset", default="fashion-mnist", help="gives the input shape and class count")
    b.add_argument("--shape", help="input shape C,H,W instead of the dataset's (e.g. 3,32,32)")
    b.add_argument("--num-classes", type=int)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (warm-up covers compiling)")
    b.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    b.add_argument("--device", default="auto")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    b.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is reported (default: 5)")
    b.add_argument("--steps", type=int, default=10, help="steps per timed block (default: 10)")
    b.add_argument("--teacher-model", default="resnet56", help="random-weight teacher of offline methods")
    b.add_argument("--method-options", nargs="+", action="extend", metavar="METHOD:KEY=VALUE")
    b.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    b.add_argument("--quiet", action="store_true", help="print only the final table")
    b.add_argument("--data", action="store_true",
                   help="run the data-pipeline benchmark (benchmarks/data_pipeline.py)")
    b.add_argument("--data-args", help="arguments for the data-pipeline benchmark, as one string")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="baseline vs ffl vs frskd on Fashion-MNIST (minutes on 2 CPU cores)",
                       description="A small comparison on real data: resnet20, stratified training subset, "
                                   "validation split, full test set, channels_last, bf16 where measured "
                                   "faster, 1 seed, 2 workers.")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config options of every run of the demo (e.g. lr=0.1; the demo's own settings otherwise)")
    d.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=f"(default: {DEMO_EPOCHS})")
    d.add_argument("--subset", type=int, default=DEMO_SUBSET,
                   help=f"training images (default: {DEMO_SUBSET})")
    d.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto (default): bf16 on a GPU, or where a few timed steps on this CPU show it "
                        "faster; else fp32")
    d.add_argument("--out", default="runs/demo", help="(default: runs/demo)")
    d.add_argument("--workers", type=int, default=2, help="(default: 2)")
    d.add_argument("--threads", type=int, default=1, help="threads per worker (default: 1)")
    d.set_defaults(func=cmd_demo)

    tu = sub.add_parser(
        "tune", help="hyper-parameter search with Optuna, scored on validation accuracy (resumable study)",
        description="Search a method's options and config keys with Optuna. Each trial is a training run "
                    "(OUT/trials/trial-NNNN) scored by the deploy head's best validation accuracy; the test split "
                    "is never read. The study is kept in --storage (default sqlite:///OUT/study.db): run the "
                    "same command again to resume it, or in a second shell to share the work. Trailing "
                    "key=value options are settings of every trial. See docs/tune.md.")
    tu.add_argument("overrides", nargs="*", metavar="key=value", help="settings of every trial (epochs=4 subset=2000)")
    tu.add_argument("--method", required=True, help="the method to tune (fusionkd list)")
    tu.add_argument("--space", nargs="+", action="extend", metavar="[METHOD:]KEY=DIST",
                    help="e.g. frskd:alpha=loguniform:0.5:4 frskd:beta=int:10:200 lr=loguniform:0.01:0.2; "
                         "DIST: uniform:LO:HI[:STEP], loguniform:LO:HI, int:LO:HI[:STEP], logint:LO:HI, choice:A,B")
    tu.add_argument("--space-file", help="YAML mapping [METHOD:]KEY: DIST (string or {type, low, high, step, choices})")
    tu.add_argument("--trials", type=int, default=20, help="finished (complete or pruned) trials the study should "
                                                           "hold (default: 20)")
    tu.add_argument("--out", default="runs/tune", help="study folder (default: runs/tune)")
    tu.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    tu.add_argument("--study-name", help="(default: the name of --out)")
    tu.add_argument("--config", help="YAML file of settings of every trial (key=value wins over it)")
    tu.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    tu.add_argument("--sampler-seed", type=int, default=0)
    tu.add_argument("--pruner", default="median", choices=["median", "halving", "none"],
                    help="stop unpromising trials by their per-epoch validation accuracy (default: median)")
    tu.add_argument("--prune-startup", type=int, default=3, help="median: first trials never pruned (default: 3)")
    tu.add_argument("--prune-warmup", type=int, default=1, help="prune from this epoch on (default: 1)")
    tu.add_argument("--confirm-seeds", help="then train the best settings, the defaults and the baseline on these "
                                            "seeds (e.g. 0,1,2) through compare")
    tu.add_argument("--confirm-workers", type=int, default=1, help="compare workers of the confirmation")
    tu.add_argument("--confirm-options", nargs="+", action="extend", metavar="KEY=VALUE",
                    help="settings of the confirmation runs only, for every arm (e.g. eval_every=4)")
    tu.add_argument("--plugin", action="append", metavar="FILE.py",
                    help="a local file registering methods/models/datasets (every trial loads it)")
    tu.set_defaults(func=cmd_tune)
