"""Reliability odds and ends (issue #23), each made to happen for real:

* two ``fusionkd compare`` processes on one ``--out``: the second is refused at once, holder named, exit 2;
* a tracking store that cannot be reached (a closed loopback port, a loopback port that never answers) or
  created (a sqlite file under a regular file, or a folder as the file) is refused within seconds, URI named;
* ``SIGTERM`` / ``SIGHUP`` to a training process stop it as Ctrl-C does (message, exit code 128 + signum,
  resumable, MLflow run ``KILLED``, not ``RUNNING``); a stop that lands inside a checkpoint write waits for
  the write to end;
* the online methods' peer counts are bounded (2 to 16);
* a plug-in file that calls ``sys.exit`` at import is a named plug-in failure (exit code 2), a
  ``KeyboardInterrupt`` passes through;
* ``--resume`` names the plug-in file it is about to import before importing it.

Every run is a tiny synthetic one (resnet20 on 16 px, 48 training images), one thread; network traffic stays
on the loopback interface.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fusionkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: data and optimisation of every run here (compare takes them as common options)
DATA = dict(dataset="synthetic", dataset_options={"num_classes": 4, "in_chans": 1, "train_size": 64, "test_size": 32},
            image_size=16, val_fraction=0.25, batch_size=16, eval_batch_size=64, epochs=2, lr=0.01)
#: a train run: DATA plus what compare sets itself
RUN = dict(DATA, method="baseline", model="resnet20", progress="none", threads=1)


def _flags(**changes) -> list[str]:
    """RUN (with ``changes``) as command-line ``key=value`` options."""
    return [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in dict(RUN, **changes).items()]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _default_stop_signals() -> None:
    """In the child: SIGTERM/SIGHUP as a terminal would deliver them. Run under ``nohup`` (whose SIG_IGN a
    child inherits), fusionkd rightly keeps ignoring SIGHUP, and the stop tests would test nothing."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _fusionkd(args: list[str], **kw) -> subprocess.Popen:
    """``python -m fusionkd ARGS`` in a fresh process (stdout and stderr as text pipes)."""
    return subprocess.Popen([sys.executable, "-m", "fusionkd", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_stop_signals, **kw)


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``ready()`` until true; fail with the process's output if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (code {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------- 1. one compare per output folder
@pytest.mark.slow
def test_a_second_compare_on_the_same_out_is_refused_with_the_holder_named(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "baseline", "--models", "resnet20", "--seeds", "0", "--out", str(out),
            "--threads", "1", "--config", _yaml(tmp_path / "common.yaml", DATA)]
    first = _fusionkd(argv)
    try:
        lock = out / ".lock"
        _wait_for("the first compare holds the folder",
                  lambda: lock.is_file() and f'"pid": {first.pid}' in lock.read_text(), first)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock: keep it holding while the second one tries
        try:
            t0 = time.monotonic()
            code = main(argv)  # the second compare: this (other) process, same command, same folder
            seconds = time.monotonic() - t0
        finally:
            os.kill(first.pid, signal.SIGCONT)
        second = capsys.readouterr()
        out_text, err_text = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 2 and seconds < 10
    assert second.out == ""  # refused before planning or training anything
    err = second.err.strip()
    assert err.startswith(f"fusionkd compare: error: output folder {str(out)!r} is in use by another fusionkd "
                          f"compare (PID {first.pid} on {socket.gethostname()}, started ")
    assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: \S*fusionkd\S* compare --methods baseline", err)
    assert "choose another --out" in err and "\n" not in err  # one line

    # the first one was not disturbed: it trained its run and reported it, once, as finished
    assert first.returncode == 0, err_text
    assert "[1/1] baseline resnet20 seed 0: done" in out_text
    report = (out / "report.md").read_text()
    assert "did not finish" not in report
    assert json.loads((out / "runs" / "resnet20" / "baseline" / "s0" / "summary.json").read_text())["finished"]
    assert not (out / "runs" / "resnet20" / "baseline" / "s0" / "error.log").exists()


def test_a_waiting_caller_gets_the_folder_once_the_holder_ends(tmp_path):
    """``fusionkd tune --confirm-seeds`` waits for the folder instead (two workers of one study confirm into
    the same folder); real flocks: a second RunLock in one process is refused like another process's."""
    from fusionkd.compare.grid import CompareLockedError, lock_output

    out = tmp_path / "confirm"
    held = lock_output(out)
    with pytest.raises(CompareLockedError, match="is in use by another fusionkd compare"):
        lock_output(out)
    said: list[str] = []
    threading.Timer(0.5, held.release).start()
    t0 = time.monotonic()
    got = lock_output(out, wait=True, report=said.append, poll_s=0.05)
    try:
        assert got.held and 0.3 < time.monotonic() - t0 < 10
        assert len(said) == 1 and "waiting for it to finish" in said[0] and f"PID {os.getpid()}" in said[0]
    finally:
        got.release()


def test_a_refused_compare_leaves_no_folder_it_made(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["compare", "--methods", "baseline", "--out", str(out), "--dataset", "synthetic", "epochz=3"]) == 2
    assert "unknown option 'epochz'" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------- 2. tracking store checked first
@pytest.fixture()
def loopback_only(monkeypatch):
    """No proxy: the tracking requests of these tests go to 127.0.0.1 and nowhere else."""
    pytest.importorskip("mlflow")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _train_with_store(tmp_path: Path, uri: str, capsys) -> tuple[int, str, float]:
    cfg = _yaml(tmp_path / "run.yaml", RUN)
    t0 = time.monotonic()
    code = main(["train", "--config", cfg, f"out_dir={tmp_path / 'runs'}", "name=t", "tracker=mlflow",
                 f"tracker_uri={uri}"])
    return code, capsys.readouterr().err.strip().splitlines()[-1], time.monotonic() - t0


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_refused_in_seconds(tmp_path, capsys, loopback_only):
    from fusionkd.engine.trackers.mlflow import PREFLIGHT_TIMEOUT_S

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens there now: connections are refused
    uri = f"http://127.0.0.1:{port}"
    code, err, seconds = _train_with_store(tmp_path, uri, capsys)
    assert code == 2 and seconds < 20
    assert err == (f"fusionkd train: error: tracker mlflow could not start: tracker_uri={uri!r}: connection "
                   "refused; start the tracking server, fix the URI, or use a local store (sqlite:///PATH.db) "
                   "(checked before training)")
    assert not (tmp_path / "runs" / "t").exists()  # refused before any epoch: no run folder left

    silent = socket.socket()  # listens (the kernel accepts connections) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, err, seconds = _train_with_store(tmp_path, uri, capsys)
    finally:
        silent.close()
    assert code == 2
    assert PREFLIGHT_TIMEOUT_S <= seconds < PREFLIGHT_TIMEOUT_S + 15  # the timeout bounds the wait
    assert err.startswith(f"fusionkd train: error: tracker mlflow could not start: tracker_uri={uri!r}: the "
                          f"server accepted the connection but did not answer within {PREFLIGHT_TIMEOUT_S:g} s")
    assert not (tmp_path / "runs" / "t").exists()


def test_an_uncreatable_sqlite_store_is_refused_at_once(tmp_path, capsys, loopback_only):
    afile = tmp_path / "afile"
    afile.write_text("a plain file")
    uri = f"sqlite:///{afile}/x.db"
    code, err, seconds = _train_with_store(tmp_path, uri, capsys)
    assert code == 2 and seconds < 20
    assert err.startswith(f"fusionkd train: error: tracker mlflow could not start: tracker_uri={uri!r}: its "
                          f"folder {str(afile)!r} cannot be created: {str(afile)!r} is a file, not a folder")
    # a folder where the database file should be: MLflow itself would retry "unable to open database file"
    # with growing back-off for minutes
    (tmp_path / "adir").mkdir()
    uri = f"sqlite:///{tmp_path / 'adir'}"
    code, err, seconds = _train_with_store(tmp_path, uri, capsys)
    assert code == 2 and seconds < 20
    assert f"tracker_uri={uri!r}: {str(tmp_path / 'adir')!r} is a folder, not a database file" in err
    assert not (tmp_path / "runs" / "t").exists()


# ---------------------------------------------------------------------- 3. SIGTERM / SIGHUP
def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _stop_after_first_epoch(tmp_path: Path, sig: int, extra: list[str]) -> tuple[subprocess.Popen, str, Path]:
    """Start a 10-epoch training process, send it ``sig`` once epoch 1 is finished: its ``last.pt`` is there
    (the metrics line is written before ``last.pt``, so waiting on it alone races the checkpoint's write)."""
    run = tmp_path / "runs" / "s"
    proc = _fusionkd(["train", "--config", _yaml(tmp_path / "run.yaml", RUN), f"out_dir={tmp_path / 'runs'}",
                      "name=s", "epochs=10", *extra])
    try:
        _wait_for("epoch 1's last.pt", lambda: (run / "last.pt").is_file(), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err, run


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c_and_the_run_resumes(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc, err, run = _stop_after_first_epoch(tmp_path, signal.SIGTERM, ["tracker=mlflow", f"tracker_uri={uri}"])
    assert proc.returncode == 128 + signal.SIGTERM, err  # 143, as a shell reports a process killed by SIGTERM
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM; the last finished epoch is in {run / 'last.pt'}: "
                                            f"resume with `fusionkd train --resume {run}`")
    assert "Traceback" not in err
    done = _lines(run / "metrics.jsonl")
    assert 1 <= done < 10 and not (run / "summary.json").exists()
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"  # not left RUNNING

    resumed = _fusionkd(["train", "--resume", str(run)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _lines(run / "metrics.jsonl") == 10
    assert json.loads((run / "summary.json").read_text())["finished"]
    assert client.get_run(run_id).info.status == "FINISHED"  # the same MLflow run, continued and closed


def test_sighup_stops_training_with_exit_code_129(tmp_path):
    # 300 tiny epochs: the run cannot finish before the signal lands, however loaded the machine
    proc, err, run = _stop_after_first_epoch(tmp_path, signal.SIGHUP, ["epochs=300"])
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert f"stopped by SIGHUP; the last finished epoch is in {run / 'last.pt'}" in err
    assert (run / "last.pt").is_file() and not (run / "summary.json").exists()


class _SignalsWhilePickled:
    """Sends this process SIGTERM from inside ``torch.save``'s pickler, i.e. in the middle of a checkpoint
    write (where a KeyboardInterrupt would turn into torch's RuntimeError and hide the stop)."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (int, (0,))


@pytest.mark.slow
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_a_stop_during_a_checkpoint_write_waits_for_the_write_to_end(tmp_path):
    import torch

    from fusionkd.cli import StopSignal, stop_signals_as_interrupts
    from fusionkd.engine.checkpoint import atomic_save

    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    written = False
    try:
        with pytest.raises(StopSignal, match="SIGTERM"), stop_signals_as_interrupts() as received:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)  # else it would kill us
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # an ignored signal stays ignored
            atomic_save({"epoch": 3, "w": torch.arange(1000.0), "x": _SignalsWhilePickled()}, tmp_path / "last.pt")
            written = True
            time.sleep(10)  # the held-back stop is raised here, right after the write
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
    assert written and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # whole, no temporary file
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=False)["w"], torch.arange(1000.0))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# ---------------------------------------------------------------------- 4. peer counts bounded
@pytest.mark.parametrize(("method", "option"), [("dml", "peers"), ("ffl", "peers"), ("ffl_s", "branches"),
                                                ("one", "branches"), ("mfef", "students")])
def test_online_peer_counts_are_bounded(method, option, tmp_path, capsys):
    from fusionkd.engine.config import ConfigError, resolve_config
    from fusionkd.methods.peers import MAX_PEERS

    assert MAX_PEERS == 16
    assert resolve_config({"method": method, "options": {option: 16}}).options == {option: 16}
    for bad in (17, 1000):
        with pytest.raises(ConfigError, match=rf"{option} must be at most 16, got {bad} \(accepted: 2 to 16 "):
            resolve_config({"method": method, "options": {option: bad}})
    assert main(["train", "--method", method, f"options.{option}=1000", "--dataset", "synthetic",
                 f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fusionkd train: error: method {method!r}: {option} must be at most 16, got 1000 "
                          "(accepted: 2 to 16 networks trained side by side")


def test_a_models_list_longer_than_the_bound_is_refused(tmp_path):
    import fusionkd

    with pytest.raises(ValueError, match=r"trains at most 16 networks, got 17 in models= \(accepted: 2 to 16\)"):
        fusionkd.train(**dict(RUN, method="dml", models=["resnet20"] * 17, out_dir=str(tmp_path), name="m"))
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------- 5. plug-ins that exit
@pytest.mark.parametrize(("body", "code"), [("import sys\nsys.exit(3)\n", "3"), ("raise SystemExit\n", "None"),
                                            ("import sys\nsys.exit('bye')\n", "'bye'")],
                         ids=["exit-3", "SystemExit", "exit-text"])
def test_a_plugin_calling_sys_exit_at_import_is_a_named_failure(tmp_path, capsys, body, code):
    plugin = tmp_path / "quits.py"
    plugin.write_text(body)
    before = set(sys.modules)
    assert main(["train", "--plugin", str(plugin), *_flags(out_dir=str(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fusionkd train: error: plug-in {plugin} failed to import: it called sys.exit({code}) while "
                   "being imported (a plug-in must only define and register)")
    assert not any(m.startswith("fusionkd_plugin_quits") for m in set(sys.modules) - before)
    assert main(["list", "--plugin", str(plugin)]) == 2  # every command that loads plug-ins says the same
    assert f"plug-in {plugin} failed to import: it called sys.exit({code})" in capsys.readouterr().err


def test_a_keyboard_interrupt_in_a_plugin_passes_through(tmp_path, capsys):
    plugin = tmp_path / "ctrl_c.py"
    plugin.write_text("raise KeyboardInterrupt\n")
    assert main(["train", "--plugin", str(plugin), *_flags(out_dir=str(tmp_path))]) == 130  # as Ctrl-C
    assert "interrupted" in capsys.readouterr().err
    assert not any(m.startswith("fusionkd_plugin_ctrl_c") for m in sys.modules)


# ---------------------------------------------------------------------- 6. resume names the plug-in first
MARKER_PLUGIN = '''
import sys

from fusionkd.models import create_model, register_model

sys.stderr.write("PLUGIN-MARKER: the plug-in's code runs now\\n")
sys.stderr.flush()


@register_model("marker_net", "resnet20 under another name, from a plug-in file")
def marker_net(num_classes=10, in_chans=3):
    return create_model("resnet20", num_classes=num_classes, in_chans=in_chans)
'''


def test_resume_names_the_plugin_file_before_importing_it(tmp_path, capsys):
    from fusionkd.models import MODELS

    plugin = tmp_path / "marker.py"
    plugin.write_text(MARKER_PLUGIN)
    try:
        assert main(["train", "--plugin", str(plugin), *_flags(model="marker_net", epochs=1,
                                                               out_dir=str(tmp_path / "runs"), name="p")]) == 0
    finally:
        MODELS._entries.pop("marker_net", None)
    capsys.readouterr()
    run = tmp_path / "runs" / "p"
    resumed = _fusionkd(["train", "--resume", str(run)], cwd=tmp_path)  # a fresh process imports it again
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    lines = err.splitlines()
    said = [i for i, ln in enumerate(lines) if f"resuming {run} imports plug-in code from {plugin} " in ln]
    ran = [i for i, ln in enumerate(lines) if ln.startswith("PLUGIN-MARKER")]
    assert len(said) == 1 and len(ran) == 1 and said[0] < ran[0], err
    assert "resume only run folders you trust" in lines[said[0]]
