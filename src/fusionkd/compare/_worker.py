"""The worker process of ``fusionkd compare --workers N`` and ``fusionkd bench`` (internal).

``python -m fusionkd.compare._worker run TASK.json RESULT.json``: train or resume the run described in
``TASK.json`` (written by :class:`fusionkd.compare.runner.GridRunner`) and write its result to ``RESULT.json``.
``SIGTERM`` (what the parent sends when it is stopped) and ``SIGHUP`` stop the run as Ctrl-C does: its last
finished epoch stays in ``last.pt``, its trackers end, and the process exits with 128 + the signal's number.

``python -m fusionkd.compare._worker bench JOB_JSON``: measure one method × model in this fresh process
(:func:`fusionkd.compare.bench.measure`) and write the result as one JSON line on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "run":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
        from ..engine.stops import StopSignal, stop_signals_as_interrupts
        from .runner import execute

        task = json.loads(Path(argv[1]).read_text())
        with stop_signals_as_interrupts():
            try:
                res = execute(task["config"], task["action"], task["threads"], task.get("device"),
                              task.get("progress"), task.get("status_file"))
            except KeyboardInterrupt as e:
                how = f"stopped by {e}" if isinstance(e, StopSignal) else "interrupted"
                print(f"{how}; the run's last finished epoch is in its last.pt", file=sys.stderr, flush=True)
                return 128 + e.signum if isinstance(e, StopSignal) else 130
        tmp = Path(argv[2] + ".tmp")
        tmp.write_text(json.dumps(res, default=str))
        os.replace(tmp, argv[2])
        return 0 if res.get("ok") else 1
    if len(argv) == 2 and argv[0] == "bench":
        from .bench import measure

        print(json.dumps(measure(json.loads(argv[1]))), flush=True)
        return 0
    print("usage: python -m fusionkd.compare._worker run TASK.json RESULT.json | bench JOB_JSON",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
