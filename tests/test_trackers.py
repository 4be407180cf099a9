"""Experiment tracking: the callback interface of the loop, and MLflow against a real local sqlite store read
back with MLflow's own client (no mock)."""

from __future__ import annotations

import json

import pytest

import fusionkd
from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.engine.trackers import Callback
from fusionkd.engine.trainer import Trainer

RUN = dict(method="baseline", model="wrn_16_1", dataset="synthetic",
           dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 32}, image_size=16,
           val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=3, progress="none", threads=1)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, config, run_dir, start_epoch):
        self.events.append(("start", config["method"], start_epoch))

    def on_epoch_end(self, metrics):
        assert (run_dir := self.run_dir) and (run_dir / "last.pt").is_file()  # after the checkpoint
        self.events.append(("epoch", metrics["epoch"], sorted(metrics["val"])))

    def on_run_end(self, summary, run_dir, error):
        self.events.append(("end", summary is not None and summary["finished"], error))


def test_callbacks_are_called_in_order_and_can_stop_a_run(tmp_path):
    cfg = resolve_config(RUN, {"out_dir": str(tmp_path), "name": "r"})
    rec = Recorder()
    rec.run_dir = cfg.run_dir
    t = Trainer(cfg)
    t.callbacks.append(rec)
    t.fit()
    assert rec.events == [("start", "baseline", 0), ("epoch", 1, ["net"]), ("epoch", 2, ["net"]),
                          ("epoch", 3, ["net"]), ("end", True, None)]

    class Stop(Recorder):
        def on_epoch_end(self, metrics):
            super().on_epoch_end(metrics)
            raise KeyboardInterrupt  # what a tuner's prune or a user's stop looks like to the loop

    cfg2 = resolve_config(RUN, {"out_dir": str(tmp_path), "name": "s"})
    stop = Stop()
    stop.run_dir = cfg2.run_dir
    t2 = Trainer(cfg2)
    t2.callbacks.append(stop)
    with pytest.raises(KeyboardInterrupt):
        t2.fit()
    assert stop.events[-1][0] == "end" and isinstance(stop.events[-1][2], KeyboardInterrupt)
    done = fusionkd.resume(cfg2.run_dir)  # the epoch it stopped after is kept: the run resumes from it
    assert done.summary["finished"] and len((cfg2.run_dir / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_mlflow_store_read_back(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "runs"
    r = fusionkd.train(**RUN, out_dir=str(out), name="m", tracker="mlflow", tracker_uri=uri,
                       tracker_experiment="fmnist-study", options={}, stop_after=2)
    assert not r.summary["finished"]
    marker = json.loads((out / "m" / "mlflow_run.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(marker["run_id"]).info.status == "KILLED"  # stopped after 2 of 3 epochs
    done = fusionkd.resume(out / "m")  # the resumed run logs into the same MLflow run
    assert done.summary["finished"]

    exp = client.get_experiment_by_name("fmnist-study")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == marker["run_id"]
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    p = run.data.params
    assert p["method"] == "baseline" and p["epochs"] == "3" and p["dataset_options.num_classes"] == "4"
    assert p["augment.flip"] == "true" and p["lr"] == "0.1"
    assert run.data.tags["fusionkd.model"] == "wrn_16_1"
    history = client.get_metric_history(run.info.run_id, "val/net")
    lines = [json.loads(x) for x in (out / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [(h.step, h.value) for h in history] == [(m["epoch"], pytest.approx(m["val"]["net"])) for m in lines]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train/loss_ce")] == [1, 2, 3]
    assert run.data.metrics["best/test"] == pytest.approx(done.best_test_accuracy)
    assert run.data.metrics["last/test"] == pytest.approx(done.last_test_accuracy)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml", "metrics.jsonl"} <= arts
    stored = tmp_path / "mlartifacts" / "fmnist-study"  # beside the database, never in the current folder
    assert (stored / next(stored.iterdir()).name / "artifacts" / "summary.json").is_file()


def test_a_tracker_that_cannot_start_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="tracker='wandb' is not a tracker; accepted: none, tensorboard, mlflow"):
        resolve_config(RUN, {"tracker": "wandb"})
    with pytest.raises(ConfigError, match="is not an MLflow tracking URI"):
        resolve_config(RUN, {"tracker": "mlflow", "tracker_uri": "mlflow.db"})
    with pytest.raises(ConfigError, match="only used by tracker=mlflow"):
        resolve_config(RUN, {"tracker_uri": "sqlite:///x.db"})
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:  # a missing package is named before any work
        for layer in ({"tracker": "tensorboard"}, {"tensorboard": True}):
            with pytest.raises(ConfigError, match="needs the tensorboard package: pip install tensorboard"):
                resolve_config(RUN, layer)
    pytest.importorskip("mlflow")
    blocker = tmp_path / "file"
    blocker.write_text("")  # the store's folder would have to be inside a plain file
    cfg = resolve_config(RUN, {"tracker": "mlflow", "tracker_uri": f"sqlite:///{blocker}/sub/m.db",
                               "out_dir": str(tmp_path / "runs"), "name": "x"})
    with pytest.raises(ConfigError, match="tracker mlflow could not start"):
        Trainer(cfg).fit()
    assert not (tmp_path / "runs" / "x").exists()  # refused before any epoch: no folder left behind
