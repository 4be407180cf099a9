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

Before anything is created, :func:`preflight` checks that the store answers, within
:data:`PREFLIGHT_TIMEOUT_S` seconds: an ``http(s)://`` server must answer an HTTP request (MLflow's own client
would retry an unreachable or failing server with growing back-off for minutes), a ``sqlite:///`` database
must be creatable and writable (MLflow would retry "unable to open database file" the same way), a database
server (``postgresql://``, ``mysql://``) must accept a connection. A store that fails is refused with a
:class:`~.base.TrackerError` naming the URI and the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from .base import Callback, TrackerError, deferred_stops, flat_metrics

#: MLflow rejects longer parameter values
_MAX_PARAM = 6000
#: seconds :func:`preflight` waits for the tracking store to answer (connect, and again for the answer)
PREFLIGHT_TIMEOUT_S = 5.0
_DB_PORTS = {"postgresql": 5432, "mysql": 3306}


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


def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///PATH`` URI (None for an in-memory database)."""
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def _refuse(uri: str, why: str, hint: str) -> TrackerError:
    return TrackerError(f"tracker mlflow could not start: tracker_uri={uri!r}: {why}; {hint} (checked before "
                        "training)")


def _check_sqlite(uri: str, timeout: float) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    db = Path(path).expanduser()
    hint = "choose a database file in a folder you can write, e.g. sqlite:///runs/mlflow.db"
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((a for a in [db.parent, *db.parent.parents] if a.exists()), None)
        why = (f"its folder {str(db.parent)!r} cannot be created: {str(blocker)!r} is a file, not a folder"
               if blocker is not None and not blocker.is_dir() else
               f"its folder {str(db.parent)!r} cannot be created ({e.strerror or e})")
        raise _refuse(uri, why, hint) from None
    if db.is_dir():
        raise _refuse(uri, f"{str(db)!r} is a folder, not a database file", hint)
    try:
        con = sqlite3.connect(str(db), timeout=timeout)
        try:
            con.execute("BEGIN IMMEDIATE")  # takes the write lock: proves the file is a writable database
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            return  # another process is writing to it right now: it is a working store
        raise _refuse(uri, f"the database {str(db)!r} cannot be opened for writing ({e})", hint) from None
    except sqlite3.DatabaseError as e:
        raise _refuse(uri, f"{str(db)!r} is not a usable SQLite database ({e})", hint) from None


def _check_http(uri: str, timeout: float) -> None:
    import requests  # MLflow's own HTTP client library: the same proxies and certificates as its calls

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    hint = "start the tracking server, fix the URI, or use a local store (sqlite:///PATH.db)"
    try:
        r = requests.get(url, params={"max_results": 1}, timeout=(timeout, timeout))
    except requests.exceptions.ConnectTimeout:
        raise _refuse(uri, f"no connection within {timeout:g} s", hint) from None
    except requests.exceptions.ReadTimeout:
        raise _refuse(uri, f"the server accepted the connection but did not answer within {timeout:g} s",
                      hint) from None
    except requests.exceptions.SSLError as e:
        raise _refuse(uri, f"TLS failed ({e})", hint) from None
    except requests.exceptions.ConnectionError as e:
        reason = "connection refused" if "refused" in str(e).lower() else f"cannot connect ({e})"
        raise _refuse(uri, reason, hint) from None
    except requests.exceptions.RequestException as e:
        raise _refuse(uri, f"{type(e).__name__}: {e}", hint) from None
    if r.status_code >= 500:
        raise _refuse(uri, f"the server answers HTTP {r.status_code} (MLflow would retry it for minutes)", hint)


def _check_db_server(uri: str, scheme: str, timeout: float) -> None:
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname:
        return  # a local socket: nothing to reach over the network
    port = parts.port or _DB_PORTS.get(scheme.split("+", 1)[0])
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise _refuse(uri, f"no connection to {parts.hostname}:{port} ({e.strerror or e})",
                      "start the database server or fix the URI") from None


def preflight(uri: str, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Check, within ``timeout`` seconds per step, that the tracking store ``uri`` can be reached and (for a
    sqlite file) written; raise :class:`~.base.TrackerError` naming the URI and the reason otherwise."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme == "sqlite":
        _check_sqlite(uri, timeout)
    elif scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif scheme.split("+", 1)[0] in _DB_PORTS:
        _check_db_server(uri, scheme, timeout)


def _params(config: dict[str, Any]) -> dict[str, str]:
    from ..flatten import flatten

    out = {}
    for k, v in flatten(config).items():
        text = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
        out[k] = text[:_MAX_PARAM]
    return out


class MLflowTracker(Callback):
    """Logs a fusionkd run into an MLflow tracking store (see the module docs).

    Each hook's store I/O runs under :func:`~.base.deferred_stops`: a Ctrl-C or a ``SIGTERM`` that arrives
    during a write takes effect right after it, so the store is never left locked mid-transaction and
    :meth:`on_run_end` can still mark the run ``KILLED``.
    """

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        with deferred_stops():
            self._open(cfg)

    def on_run_start(self, config: dict[str, Any], run_dir: Path, start_epoch: int) -> None:
        with deferred_stops():
            self._start(config, run_dir, start_epoch)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        with deferred_stops():
            self._epoch(metrics)

    def on_run_end(self, summary: dict[str, Any] | None, run_dir: Path, error: BaseException | None) -> None:
        with deferred_stops():
            self._end(summary, run_dir, error)

    def _open(self, cfg: Any) -> None:
        from mlflow import MlflowClient

        self.uri = cfg.tracker_uri or default_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.tracker_experiment or cfg.dataset
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(name, artifact_location=_artifact_root(self.uri, name))
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None
        self.cfg = cfg

    def _start(self, config: dict[str, Any], run_dir: Path, start_epoch: int) -> None:
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

    def _epoch(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(metrics["epoch"])) for k, v in flat_metrics(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def _end(self, summary: dict[str, Any] | None, run_dir: Path, error: BaseException | None) -> None:
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
        else:  # a stop (--stop-after, Ctrl-C, SIGTERM/SIGHUP, a tuner's prune) is KILLED, an error FAILED
            status = "FAILED" if error is not None and not _is_stop(error) else "KILLED"
        self.client.set_terminated(self.run_id, status=status)


def _is_stop(error: BaseException) -> bool:
    """A stop asked for from outside the run (not a failure of it): a tuner's prune, Ctrl-C, a signal."""
    return type(error).__name__ == "TrialPruned" or isinstance(error, KeyboardInterrupt)


def build(cfg: Any, run_dir: Path) -> Callback:
    check(cfg)
    preflight(cfg.tracker_uri or default_uri(cfg))
    return MLflowTracker(cfg, run_dir)
