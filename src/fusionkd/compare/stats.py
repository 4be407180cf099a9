"""The statistics that decide whether a method beats the baseline: Student's t distribution, the paired and
Welch 95 % confidence intervals of a mean difference, and Welch's t-test.

Plain Python (no scipy): the t distribution's CDF is the regularised incomplete beta function, computed by its
continued fraction (Numerical Recipes, 3rd ed., §6.4), and its quantile by bisection on the CDF. The tests
check both against hand-computed values and against scipy when it is installed.

A **gain** (or a **loss**) is called only when the 95 % interval of ``mean(method) − mean(baseline)`` excludes
zero; otherwise the two are a **tie**. The interval is the *paired* t interval over the per-seed differences
when both groups ran the same seeds (``data_seed`` fixes the split, so seed ``s`` of both methods share the
data and the initial draw of the shared parts), and Welch's interval otherwise. Welch's two-sided p-value is
always reported beside it (and the paired one when pairing applies).

No call is made without evidence: with fewer than 2 seeds per group there is no interval (**unknown**), and
when the seeds show **no spread** — every per-seed difference identical (paired), or both groups constant
(Welch), which quantised accuracies and 2-3 seeds make common — the standard error is 0, so neither an
interval nor a p-value can be estimated: the call is **undetermined** (not a gain with p = 0 from a
zero-width interval). A spread below ``1e-9`` of the values' magnitude counts as none (float rounding of
``a - b`` on two-decimal accuracies leaves ~1e-14).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: confidence level of every interval in the reports
LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability ``P(|T| >= |t|)`` of Student's t with ``df`` (> 0, may be fractional)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0.5 < p < 1``), by bisection."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0.5, 1), got {p}")
    target = 2.0 * (1.0 - p)  # two-sided tail mass beyond the quantile
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


#: a standard error at most this fraction of the values' magnitude is no spread (float rounding, not data)
NO_SPREAD = 1e-9


@dataclass(frozen=True)
class TTest:
    """A mean difference with its 95 % interval, the t statistic, degrees of freedom and two-sided p-value.

    Without spread (standard error 0) ``lo``, ``hi``, ``t`` and ``p`` are NaN: nothing can be estimated.
    """

    diff: float
    lo: float
    hi: float
    t: float
    df: float
    p: float

    @property
    def estimable(self) -> bool:
        """False when the data had no spread, so that no interval or p-value exists."""
        return not math.isnan(self.p)


def _from(diff: float, se: float, df: float, level: float, scale: float = 1.0) -> TTest:
    """The test of ``diff`` with standard error ``se``; ``scale`` is the magnitude of the values, below
    ``NO_SPREAD * scale`` the standard error is rounding and there is no spread."""
    if se <= NO_SPREAD * max(1.0, abs(scale)):  # no spread: no interval, no p-value (not an exact difference)
        return TTest(diff, math.nan, math.nan, math.nan, df, math.nan)
    half = t_quantile(0.5 + level / 2.0, df) * se
    t = diff / se
    return TTest(diff, diff - half, diff + half, t, df, t_sf2(t, df))


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> TTest:
    """Welch's unequal-variance t-test of ``mean(a) − mean(b)`` (Welch–Satterthwaite df); both need >= 2."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per group, got {len(a)} and {len(b)}")
    return welch_from_summary(statistics.fmean(a), statistics.stdev(a), len(a),
                              statistics.fmean(b), statistics.stdev(b), len(b), level)


def welch_from_summary(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                       level: float = LEVEL) -> TTest:
    """Welch's test from means, sample stds (ddof = 1) and counts (e.g. a published mean ± std table)."""
    va, vb = std_a ** 2 / n_a, std_b ** 2 / n_b
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1)) if se > 0 else float(n_a + n_b - 2)
    return _from(mean_a - mean_b, se, df, level, scale=max(abs(mean_a), abs(mean_b)))


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> TTest:
    """The paired t-test of the differences ``a[i] − b[i]`` (same seeds); needs >= 2 pairs."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired test needs >= 2 pairs of equal length, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    scale = max(abs(v) for v in (*a, *b))
    return _from(statistics.fmean(d), statistics.stdev(d) / math.sqrt(n), float(n - 1), level, scale)


@dataclass(frozen=True)
class Verdict:
    """How a method compares with the baseline on one measure (e.g. last-epoch deploy-head test accuracy).

    ``interval`` is the test the decision is made on (paired when the seeds match, else Welch); ``welch`` is
    always there when both groups have >= 2 seeds.
    """

    diff: float
    n_method: int
    n_baseline: int
    interval: TTest | None
    welch: TTest | None
    paired: bool

    @property
    def call(self) -> str:
        """``"gain"``, ``"loss"``, ``"tie"`` (the interval holds 0), ``"unknown"`` (too few seeds) or
        ``"undetermined"`` (no spread between seeds: no interval can be estimated); see :attr:`reason`."""
        if self.interval is None:
            return "unknown"
        if not self.interval.estimable:
            return "undetermined"
        if self.interval.lo > 0:
            return "gain"
        if self.interval.hi < 0:
            return "loss"
        return "tie"

    @property
    def reason(self) -> str | None:
        """Why there is no interval (``unknown`` / ``undetermined``); None when there is one."""
        if self.interval is None:
            return f"{self.n_method} vs {self.n_baseline} seed(s): at least 2 of each are needed for an interval"
        if self.interval.estimable:
            return None
        what = (f"every per-seed difference is {self.diff:+.2f}" if self.paired
                else "both groups are constant over their seeds")
        return f"no spread between seeds ({what}): cannot estimate an interval"

    def format(self) -> str:
        """``"+0.52 [-0.31, +1.35] tie"``; ``"+0.52 (n=1: unknown)"`` and ``"+1.00 (no spread: undetermined)"``
        without an interval."""
        if self.interval is None:
            return f"{self.diff:+.2f} (n={min(self.n_method, self.n_baseline)}: unknown)"
        if not self.interval.estimable:
            return f"{self.diff:+.2f} (no spread: undetermined)"
        return f"{self.diff:+.2f} [{self.interval.lo:+.2f}, {self.interval.hi:+.2f}] {self.call}"

    def detail(self) -> str:
        """The test behind the call, for the significance notes of a report."""
        if self.interval is None:
            return self.reason
        kind = (f"paired t over {self.n_method} seeds" if self.paired
                else f"Welch t, {self.n_method} vs {self.n_baseline} seeds")
        if not self.interval.estimable:
            out = f"{kind}: {self.reason}"
        else:
            out = f"{kind}, df {self.interval.df:.1f}"
            if self.paired:
                out += f", paired p = {_p(self.interval.p)}"
        if self.welch is not None and (self.paired or self.interval.estimable):
            out += f", Welch p = {_p(self.welch.p)}" if self.welch.estimable else ", Welch: no spread"
            if self.paired and not self.interval.estimable and self.welch.estimable:
                out += " (unpaired: not the test the call is made on)"
        return out


def _p(p: float) -> str:
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"


def compare_groups(method: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL
                   ) -> Verdict | None:
    """The :class:`Verdict` of ``method`` against ``baseline``, each ``{seed: value}``; None when either is empty.

    Paired when the two seed sets are equal (and >= 2), else Welch when each group has >= 2 values.
    """
    if not method or not baseline:
        return None
    a, b = list(method.values()), list(baseline.values())
    diff = statistics.fmean(a) - statistics.fmean(b)
    w = welch(a, b, level) if len(a) >= 2 and len(b) >= 2 else None
    if set(method) == set(baseline) and len(method) >= 2:
        seeds = sorted(method)
        p = paired([method[s] for s in seeds], [baseline[s] for s in seeds], level)
        return Verdict(diff, len(a), len(b), p, w, True)
    return Verdict(diff, len(a), len(b), w, w, False)
