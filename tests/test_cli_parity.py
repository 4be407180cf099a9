"""The command line is one language: every subcommand that trains (train, compare, tune, bench, demo) takes
the config's options as ``--key value`` and as ``key=value``, with the same refusals and did-you-mean.

The same options are run through each subcommand; a refusal must come before any work (no output folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusionkd.cli import main

#: the part of each subcommand's command line that is not under test (tiny, fast, into OUT)
BASES = {
    "train": lambda out: ["train", "--dataset", "synthetic", "--out-dir", str(out)],
    "compare": lambda out: ["compare", "--methods", "baseline", "--dataset", "synthetic", "--out", str(out)],
    "tune": lambda out: ["tune", "--method", "baseline", "--space", "lr=loguniform:0.01:0.2", "--trials", "1",
                         "--out", str(out)],
    "bench": lambda out: ["bench", "--methods", "baseline", "--dataset", "synthetic", "--shape", "1,16,16",
                          "--num-classes", "4", "--json", str(out / "bench.json")],
    "demo": lambda out: ["demo", "--out", str(out)],
}


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c == "demo" else c  # demo: ~8 s
                                     for c in sorted(BASES)])
@pytest.mark.parametrize("form", ["flag", "key=value"])
def test_the_same_refusals_in_both_forms_through_every_subcommand(command, form, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [  # (the option as --flag, as key=value, what the refusal must say)
        (["--weight-decay", "-1"], ["weight_decay=-1"], "weight_decay=-1"),
        (["--grad-clip", "nan"], ["grad_clip=nan"], "grad_clip"),
        (["--val-fraction", "2"], ["val_fraction=2"], "val_fraction"),
    ]
    for flag, kv, says in cases:
        code, err = run(BASES[command](out) + (flag if form == "flag" else kv), capsys)
        assert code == 2, (command, flag, err)
        assert says in err and "Traceback" not in err, (command, flag, err)
    assert not out.exists(), f"{command} started work before refusing"


@pytest.mark.parametrize("command", sorted(BASES))
def test_did_you_mean_through_every_subcommand(command, tmp_path, capsys):
    code, err = run(BASES[command](tmp_path / "out") + ["weight_decy=0.1"], capsys)
    assert code == 2 and "weight_decay" in err and "Did you mean" in err, err


@pytest.mark.parametrize("command", sorted(BASES))
def test_every_config_flag_exists_in_every_subcommand(command, capsys):
    """``--help`` lists the config's flags (those a subcommand does not define with its own meaning)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--lr", "--weight-decay", "--schedule", "--grad-clip", "--val-fraction", "--seed"):
        assert flag in text, (command, flag)


def test_tune_takes_model_and_dataset_flags(tmp_path, capsys):
    # the review's report: `fusionkd tune --method baseline --model resnet20 --dataset digits` was refused
    out = tmp_path / "study"
    code, err = run(["tune", "--method", "baseline", "--model", "resnet8", "--dataset", "synthetic", "--space",
                     "lr=loguniform:0.01:0.2", "--trials", "1", "--out", str(out), "--pruner", "none",
                     "--epochs", "1", "--image-size", "16", "--batch-size", "16", "--threads", "1",
                     "dataset_options={num_classes: 3, in_chans: 1, train_size: 48, test_size: 12}"], capsys)
    assert code == 0, err
    cfg = (out / "trials" / "trial-0000" / "config.yaml").read_text()
    assert "model: resnet8" in cfg and "dataset: synthetic" in cfg and "epochs: 1" in cfg


@pytest.mark.slow
def test_bench_passes_config_options_to_the_measured_runs(tmp_path, capsys):
    code, err = run([*BASES["bench"](tmp_path), "--steps", "1", "--repeats", "1", "--warmup", "0",
                     "--momentum", "0.8", "options.temperature=2"], capsys)
    assert code == 2 and "options" in err  # a method option is not a common option of several methods
    code, err = run([*BASES["bench"](tmp_path), "--steps", "1", "--repeats", "1", "--warmup", "0",
                     "--momentum", "0.8"], capsys)
    assert code == 0, err
    assert json.loads(Path(tmp_path / "bench.json").read_text())["results"][0]["img_per_s"] > 0
    code, err = run([*BASES["bench"](tmp_path), "precision=bf16"], capsys)
    assert code == 2 and "--precision" in err  # bench's own flag, not a second way to say it


def test_flags_and_key_value_agree_and_key_value_wins(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--lr", "0.2", "--print-config"]) == 0
    assert "lr: 0.2" in capsys.readouterr().out
    assert main(["train", "--dataset", "synthetic", "--lr", "0.2", "lr=0.3", "--print-config"]) == 0
    assert "lr: 0.3" in capsys.readouterr().out


def test_a_method_recipe_yields_to_the_users_optimizer(capsys):
    # FFL's recipe sets Nesterov momentum; optimizer=adamw used to be refused with "nesterov=true needs sgd"
    assert main(["train", "--method", "ffl", "--optimizer", "adamw", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "optimizer: adamw" in out and "nesterov: false" in out
    assert main(["train", "--method", "ffl", "--print-config"]) == 0
    assert "nesterov: true" in capsys.readouterr().out  # the recipe still holds for SGD
