"""``tracker=mlflow``: one MLflow run per fusionkd run, in a local tracking store.

``tracker_uri`` is an MLflow tracking URI: ``sqlite:///PATH.db`` (the default is
``sqlite:///<out_dir>/mlflow.db``), a ``file:`` folder (MLflow 3 keeps its file store in maintenance mode:
it is accepted only with ``MLFLOW_ALLOW_FILE_STORE=true``), or an ``http(s)://`` server. The experiment
is ``tracker_experiment`` (default: the dataset name) and the MLflow run is named after the run folder.

Logged: every config option as a parameter (dotted names, e.g. ``options.alpha``), the engine's tags
(method, model, dataset, seed, family, run folder), every :func:`~.base.flat_metrics` scalar per epoch
(step = epoch), and at the end ``summary.json``, ``config.yaml`` and ``metrics.jsonl`` as artifacts (for a
sqlite store in ``<db folder>/mlartifacts/<experiment>``) plus
the summary's best/last deploy-head accuracies as metrics. A resumed run continues the same MLflow run
(its id is kept in ``RUN_DIR/mlflow_run.json``). Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from .base import Callback, TrackerError, flat_metrics

#: MLflow rejects longer parameter values
_MAX_PARAM = 6000


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go beside its database (``<db folder>/mlartifacts/<experiment>``), not into
    the current directory (MLflow's default ``./mlruns``); other stores keep their server's default."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "default"
    return (folder / safe).as_uri()


def default_uri(cfg: Any) -> str:
    return f"sqlite:///{(Path(cfg.out_dir).expanduser().resolve() / 'mlflow.db')}"


def check(cfg: Any) -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise TrackerError("tracker=mlflow needs MLflow: pip install 'fusionkd[mlflow]' (or mlflow-skinny)")
    uri = cfg.tracker_uri or default_uri(cfg)
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks"):
        raise TrackerError(f"tracker_uri={uri!r} is not an MLflow tracking URI; use sqlite:///PATH.db (local, "
                           "recommended), file:///FOLDER or http(s)://SERVER")
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackerError(f"tracker_uri={uri!r}: MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true "
                           "is set; use sqlite:///PATH.db instead (a single local file, readable by `mlflow ui "
                           "--backend-store-uri sqlite:///PATH.db`)")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            parent = Path(path).expanduser().parent
            if parent.exists() and not os.access(parent, os.W_OK):
                raise TrackerError(f"tracker_uri={uri!r}: the folder {parent} is not writable")


def _params(config: dict[str, Any]) -> dict[str, str]:
    from ...compare.aggregate import flatten

    out = {}
    for k, v in flatten(config).items():
        text = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
        out[k] = text[:_MAX_PARAM]
    return out


class MLflowTracker(Callback):
    """Logs a fusionkd run into an MLflow tracking store (see the module docs)."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        from mlflow import MlflowClient

        self.uri = cfg.tracker_uri or default_uri(cfg)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.tracker_experiment or cfg.dataset
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(name, artifact_location=_artifact_root(self.uri, name))
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None
        self.cfg = cfg

    def on_run_start(self, config: dict[str, Any], run_dir: Path, start_epoch: int) -> None:
        from mlflow.entities import Param, RunTag

        marker = run_dir / "mlflow_run.json"
        if start_epoch > 0 and marker.is_file():
            with_id = json.loads(marker.read_text())
            if with_id.get("tracking_uri") == self.uri:
                self.run_id = with_id["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
        c = self.cfg
        tags = {"fusionkd.method": c.method, "fusionkd.model": c.model, "fusionkd.dataset": c.dataset,
                "fusionkd.seed": str(c.seed), "fusionkd.run_dir": str(run_dir)}
        run = self.client.create_run(self.experiment_id, run_name=c.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in _params(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100],
                                  tags=[RunTag("mlflow.note.content", f"fusionkd run {run_dir}")] if i == 0 else [])
        atomic_write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id,
                                      "experiment_id": self.experiment_id}), marker)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(metrics["epoch"])) for k, v in flat_metrics(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def on_run_end(self, summary: dict[str, Any] | None, run_dir: Path, error: BaseException | None) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        if summary is not None:
            head = summary["deploy_head"]
            now = int(time.time() * 1000)
            final = {"best/val": (summary.get("best") or {}).get("val", {}).get(head),
                     "best/test": ((summary.get("best") or {}).get("test") or {}).get(head),
                     "last/test": (summary.get("last") or {}).get("test", {}).get(head),
                     "best/epoch": (summary.get("best") or {}).get("epoch")}
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in final.items()
                                                        if isinstance(v, (int, float))])
            for name in ("summary.json", "config.yaml", "metrics.jsonl"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
            status = "FINISHED"
        else:
            status = "FAILED" if error is not None and not _is_prune(error) else "KILLED"
        self.client.set_terminated(self.run_id, status=status)


def _is_prune(error: BaseException) -> bool:
    return type(error).__name__ == "TrialPruned"


def build(cfg: Any, run_dir: Path) -> Callback:
    check(cfg)
    return MLflowTracker(cfg, run_dir)
