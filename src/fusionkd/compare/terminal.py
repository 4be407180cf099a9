"""A compact results table for a terminal (``fusionkd compare`` prints it; ``report.md`` has the full one).

Seven columns that fit in about 100 characters: method, seeds, the deploy head's test accuracy at the
best-validation epoch and at the last epoch (mean ± std), the difference to the baseline at the
best-validation epoch with the report's call on it (gain / loss only when the 95 % interval excludes zero,
else tie; unknown with one seed; undetermined when the seeds show no spread), the best auxiliary head, and
training time per run.
"""

from __future__ import annotations

from collections.abc import Sequence

from .aggregate import GroupStats
from .report import format_duration


def compact_table(groups: Sequence[GroupStats]) -> str:
    """Aligned plain-text table of one (dataset, model) group of methods."""
    header = ["method", "seeds", "best-val", "last", "gain best-val", "best aux head", "time/run"]
    rows = [header]
    for g in groups:
        if g.method == "baseline":
            gain = "(reference)"
        elif g.gain_best is None:
            gain = "-"
        else:  # the difference and report's call on it (gain / loss only when the 95 % interval excludes 0)
            gain = f"{g.gain_best.diff:+.2f} {g.gain_best.call}"
        aux = f"{g.aux_head} {g.aux_best.mean:.2f}" if g.aux_head and g.aux_best.mean is not None else "-"
        rows.append([g.method, str(len(g.seeds)), g.deploy_best.format(), g.deploy_last.format(), gain, aux,
                     format_duration(g.train_time_s.mean)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {1, 2, 3, 6}
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
