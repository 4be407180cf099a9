"""Train (or resume) a run in this process and SIGKILL it at one chosen write of an epoch end.

    python tests/fault_worker.py SPEC.json

SPEC: ``{"config": {...} | null, "resume": RUN_DIR | null, "kill": {"file": "best.pt", "when": "before" |
"temp" | "after", "nth": 2} | null, "hold_lock": RUN_DIR | null}``.

* ``file`` is the name of a file the engine writes (``last.pt``, ``best.pt``, ``summary.json``,
  ``config.yaml``, ``metrics.jsonl``); ``nth`` counts the writes of that file in this process (1-based).
* ``before``: die just before the write starts; ``temp``: die in the middle of it (the temporary file is
  complete on disk, the rename has not happened; for ``metrics.jsonl`` half a line is written);
  ``after``: die right after it finished.
* ``hold_lock``: only take the run folder's lock, print ``locked`` and wait for stdin to close.

The process kills itself with a real ``SIGKILL`` (no cleanup, no ``finally``), exactly as ``kill -9`` would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    if spec.get("hold_lock"):
        from fusionkd.engine.rundir import RunLock

        lock = RunLock(spec["hold_lock"])
        print("locked", flush=True)
        sys.stdin.read()
        lock.release()
        return

    from fusionkd.engine import checkpoint as ck
    from fusionkd.engine import trainer as tr

    kill = spec.get("kill")
    counts: dict[str, int] = {}

    def hit(name: str, when: str) -> bool:
        return bool(kill) and kill["file"] == name and kill["when"] == when and counts.get(name) == kill["nth"]

    original = ck._atomic_write

    def atomic_write(path, fill):
        path = Path(path)
        counts[path.name] = counts.get(path.name, 0) + 1
        if hit(path.name, "before"):
            die()
        if hit(path.name, "temp"):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                fill(ck._Tracking(f))
                f.flush()
                os.fsync(f.fileno())
            die()
        original(path, fill)
        if hit(path.name, "after"):
            die()

    ck._atomic_write = atomic_write
    append = tr.Trainer._append_metrics

    def append_metrics(self, metrics):
        counts["metrics.jsonl"] = counts.get("metrics.jsonl", 0) + 1
        if hit("metrics.jsonl", "before"):
            die()
        if hit("metrics.jsonl", "temp"):
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                line = json.dumps(metrics)
                f.write(line[: len(line) // 2])
            die()
        append(self, metrics)
        if hit("metrics.jsonl", "after"):
            die()

    tr.Trainer._append_metrics = append_metrics

    import fusionkd

    if spec.get("resume"):
        fusionkd.resume(spec["resume"])
    else:
        fusionkd.train(**spec["config"])
    print("finished", flush=True)


if __name__ == "__main__":
    main()
