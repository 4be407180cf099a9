"""``fusionkd tune`` end to end on tiny real studies: ``--confirm-seeds`` (the best settings and the defaults
trained again on two seeds, compared in tune.md) and the median pruner really pruning a hopeless trial."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from fusionkd.cli import main
from fusionkd.engine.config import load_yaml

optuna = pytest.importorskip("optuna")

from fusionkd import tune as T  # noqa: E402

TINY = ["dataset=synthetic", "dataset_options={num_classes: 4, in_chans: 1, train_size: 96, test_size: 32}",
        "image_size=16", "val_fraction=0.25", "batch_size=16", "eval_batch_size=64", "threads=1", "model=wrn_16_1"]


def _runs(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"config": load_yaml(p.parent / "config.yaml")}
            for p in sorted(folder.rglob("summary.json"))]


def test_confirm_seeds_trains_the_tuned_and_default_settings_on_each_seed(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["tune", "--method", "baseline", "--space", "lr=loguniform:0.01:0.03", "--trials", "1", "--out",
                 str(out), "--pruner", "none", "--confirm-seeds", "1,2", *TINY, "epochs=1"])
    assert code == 0, capsys.readouterr().err
    best = load_yaml(out / "best.yaml")
    assert 0.01 <= best["lr"] <= 0.03
    tuned, defaults = _runs(out / "confirm"), _runs(out / "confirm-defaults")
    # two seeds per arm: the tuned lr in one, the default lr (0.1) in the other, every common setting in both
    assert sorted(r["config"]["seed"] for r in tuned) == sorted(r["config"]["seed"] for r in defaults) == [1, 2]
    assert all(r["method"] == "baseline" and r["finished"] for r in tuned + defaults)
    assert {r["config"]["lr"] for r in tuned} == {best["lr"]}
    assert {r["config"]["lr"] for r in defaults} == {0.1}
    assert all(r["config"]["epochs"] == 1 and r["config"]["model"] == "wrn_16_1" for r in tuned + defaults)
    md = (out / "tune.md").read_text()
    assert "## Confirmation on seeds 1, 2" in md
    for arm, runs in (("baseline (defaults)", defaults), ("baseline (tuned)", tuned)):
        val = [r["best"]["val"][r["deploy_head"]] for r in runs]
        row = re.search(rf"^\| {re.escape(arm)} \| ([\d.]+) ± ([\d.]+) \|", md, re.M)
        assert row, md
        assert float(row.group(1)) == pytest.approx(statistics.fmean(val), abs=0.006)
        assert float(row.group(2)) == pytest.approx(statistics.stdev(val), abs=0.006)
    assert "- baseline (tuned) vs baseline (defaults):" in md


def test_the_median_pruner_prunes_a_hopeless_trial(tmp_path):
    """Trial 0 learns (lr 0.1); trial 1's lr of 1e-9 leaves the network as it was initialised, so its first
    validation accuracy is below trial 0's: the median rule (one startup trial, prunable from epoch 1) stops it
    there."""
    spec = T.TuneSpec("baseline", T.parse_space(["lr=loguniform:1e-9:0.1"], "baseline"), tmp_path / "s",
                      trials=2, common=T.parse_common([*TINY, "epochs=3"]), pruner="median", prune_startup=1,
                      prune_warmup=1)
    study = T.open_study(spec)
    study.enqueue_trial({"lr": 0.1})
    study.enqueue_trial({"lr": 1e-9})
    study = T.run_study(spec, report=lambda s: None)
    good, bad = study.get_trials()
    assert good.state == optuna.trial.TrialState.COMPLETE and good.params["lr"] == 0.1
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.params["lr"] == 1e-9
    assert bad.user_attrs["pruned_at_epoch"] == 1
    assert bad.intermediate_values[1] < good.intermediate_values[1]
    lines = (tmp_path / "s" / "trials" / "trial-0001" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # it trained one epoch of three, then stopped
    assert len((tmp_path / "s" / "trials" / "trial-0000" / "metrics.jsonl").read_text().splitlines()) == 3
    assert study.best_trial.number == 0
