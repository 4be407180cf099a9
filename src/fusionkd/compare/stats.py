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


@dataclass(frozen=True)
class TTest:
    """A mean difference with its 95 % interval, the t statistic, degrees of freedom and two-sided p-value."""

    diff: float
    lo: float
    hi: float
    t: float
    df: float
    p: float


def _from(diff: float, se: float, df: float, level: float) -> TTest:
    if se == 0.0:  # no spread at all: the difference is exact
        return TTest(diff, diff, diff, math.copysign(math.inf, diff) if diff else 0.0, df,
                     0.0 if diff else 1.0)
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
    return _from(mean_a - mean_b, se, df, level)


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> TTest:
    """The paired t-test of the differences ``a[i] − b[i]`` (same seeds); needs >= 2 pairs."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired test needs >= 2 pairs of equal length, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    return _from(statistics.fmean(d), statistics.stdev(d) / math.sqrt(n), float(n - 1), level)


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
        """``"gain"``, ``"loss"``, ``"tie"`` (the interval holds 0) or ``"unknown"`` (too few seeds)."""
        if self.interval is None:
            return "unknown"
        if self.interval.lo > 0:
            return "gain"
        if self.interval.hi < 0:
            return "loss"
        return "tie"

    def format(self) -> str:
        """``"+0.52 [-0.31, +1.35] tie"``; ``"+0.52 (1 seed: unknown)"`` without an interval."""
        if self.interval is None:
            return f"{self.diff:+.2f} (n={min(self.n_method, self.n_baseline)}: unknown)"
        return f"{self.diff:+.2f} [{self.interval.lo:+.2f}, {self.interval.hi:+.2f}] {self.call}"

    def detail(self) -> str:
        """The test behind the call, for the significance notes of a report."""
        if self.interval is None:
            return f"{self.n_method} vs {self.n_baseline} seed(s): at least 2 of each are needed for an interval"
        kind = (f"paired t over {self.n_method} seeds" if self.paired
                else f"Welch t, {self.n_method} vs {self.n_baseline} seeds")
        out = f"{kind}, df {self.interval.df:.1f}"
        if self.paired:
            out += f", paired p = {_p(self.interval.p)}"
        if self.welch is not None:
            out += f", Welch p = {_p(self.welch.p)}"
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
