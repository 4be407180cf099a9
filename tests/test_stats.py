"""The report's statistics: Student's t (closed forms for df 1 and 2), the paired and Welch intervals and
p-values against values computed by hand, and against scipy when it is installed; no call without an
interval (one seed: unknown; no spread between seeds: undetermined)."""

from __future__ import annotations

import math

import pytest

from fusionkd.compare.stats import betainc, compare_groups, paired, t_quantile, t_sf2, welch, welch_from_summary


def test_t_distribution_closed_forms():
    for t in (0.3, 1.0, 2.0, 7.0, 40.0):
        assert t_sf2(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)  # Cauchy
        assert t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_sf2(0.0, 5) == pytest.approx(1.0)
    # df 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) -> t_0.975 = sqrt(2 * 0.95^2 / (1 - 0.95^2))
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975), rel=1e-9)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 6x^2(1-x)^2 ... = 1 - (1-x)^3 (1 + 3x)
    with pytest.raises(ValueError, match="positive"):
        t_sf2(1.0, 0)


def test_paired_interval_by_hand():
    # differences 1, 1, 1.5: mean 7/6, sd sqrt(1/12), se 1/6, t = 7 on 2 df, p = 1 - 7 / sqrt(51)
    r = paired([91.0, 93.0, 95.5], [90.0, 92.0, 94.0])
    assert (r.diff, r.t, r.df) == (pytest.approx(7 / 6), pytest.approx(7.0), 2.0)
    assert r.p == pytest.approx(1 - 7 / math.sqrt(51), rel=1e-9)
    half = math.sqrt(2 * 0.9025 / 0.0975) / 6
    assert (r.lo, r.hi) == (pytest.approx(7 / 6 - half), pytest.approx(7 / 6 + half))


def test_welch_by_hand_and_degenerate_cases():
    # a = 1, 3 (mean 2, var 2), b = 0, 0, 3 (mean 1, var 3): se^2 = 2/2 + 3/3 = 2, df = 4 / (1/1 + 1/2) = 8/3
    r = welch([1.0, 3.0], [0.0, 0.0, 3.0])
    assert r.diff == pytest.approx(1.0) and r.t == pytest.approx(1 / math.sqrt(2)) and r.df == pytest.approx(8 / 3)
    assert welch_from_summary(2.0, math.sqrt(2), 2, 1.0, math.sqrt(3), 3) == r
    flat = welch([5.0, 5.0], [4.0, 4.0])  # no spread: nothing to estimate an interval or a p-value from
    assert not flat.estimable and flat.diff == 1.0
    assert all(math.isnan(v) for v in (flat.lo, flat.hi, flat.t, flat.p))
    with pytest.raises(ValueError, match="at least 2"):
        welch([1.0], [1.0, 2.0])


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [86.91, 87.64, 86.18], [87.18, 86.95, 87.41]
    r = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert r.t == pytest.approx(ref.statistic, rel=1e-9) and r.p == pytest.approx(ref.pvalue, rel=1e-7)
    rp = paired(a, b)
    refp = stats.ttest_rel(a, b)
    assert rp.p == pytest.approx(refp.pvalue, rel=1e-7)
    for df in (1.3, 2.0, 3.7, 9.0, 57.0):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-8)
        assert t_sf2(1.7, df) == pytest.approx(2 * stats.t.sf(1.7, df), rel=1e-8)


def test_verdict_calls_only_when_the_interval_excludes_zero():
    base = {0: 87.0, 1: 87.5, 2: 86.5}
    assert compare_groups({0: 88.0, 1: 88.4, 2: 87.6}, base).call == "gain"  # d = 1, 0.9, 1.1
    assert compare_groups({0: 86.0, 1: 86.6, 2: 85.4}, base).call == "loss"
    tie = compare_groups({0: 88.5, 1: 86.0, 2: 87.0}, base)  # mean +0.17, differences spread
    assert tie.call == "tie" and tie.paired and "paired p = " in tie.detail() and "Welch p = " in tie.detail()
    welch_only = compare_groups({3: 88.0, 4: 88.4}, base)
    assert not welch_only.paired and welch_only.interval is welch_only.welch
    assert compare_groups({}, base) is None and compare_groups({0: 88.0}, base).call == "unknown"


# ----------------------------------------------------------------------------- no spread, no evidence
def test_identical_per_seed_differences_are_undetermined_not_a_gain():
    """Quantised accuracies: every per-seed difference is +1.00 exactly. The old code called it a gain with
    p = 0 from the zero-width interval [+1.00, +1.00]; with no spread there is no interval to call on."""
    v = compare_groups({0: 88.33, 1: 88.70, 2: 88.24}, {0: 87.33, 1: 87.70, 2: 87.24})
    assert v.paired and v.diff == pytest.approx(1.0)
    assert v.call == "undetermined" and not v.interval.estimable
    assert v.reason == "no spread between seeds (every per-seed difference is +1.00): cannot estimate an interval"
    assert v.format() == "+1.00 (no spread: undetermined)" and "gain" not in v.format()
    assert v.detail().startswith("paired t over 3 seeds: no spread between seeds")
    assert "p = 0.000" not in v.detail() and "paired p" not in v.detail()
    assert v.welch.estimable and "Welch p = " in v.detail()  # the groups themselves vary: Welch is listed


def test_float_rounding_of_equal_differences_is_no_spread():
    """``a - b`` on two-decimal accuracies leaves ~1e-14 of spread between equal differences; the old code
    turned that into t ~ 1e14 and a gain. Two seeds, as in a short comparison."""
    a, b = {0: 90.17, 1: 85.03}, {0: 89.07, 1: 83.93}
    d = [a[s] - b[s] for s in (0, 1)]
    assert d[0] != d[1] and abs(d[0] - d[1]) < 1e-12  # not bit-identical, the same to two decimals
    v = compare_groups(a, b)
    assert v.call == "undetermined" and v.reason.startswith("no spread between seeds")
    down = compare_groups(b, a)
    assert down.call == "undetermined" and down.format() == "-1.10 (no spread: undetermined)"


def test_constant_groups_under_welch_are_undetermined():
    """Different seeds (Welch), both groups constant: Welch's standard error is 0."""
    v = compare_groups({3: 88.0, 4: 88.0}, {0: 87.0, 1: 87.0, 2: 87.0})
    assert not v.paired and v.interval is v.welch and v.call == "undetermined"
    assert v.reason == ("no spread between seeds (both groups are constant over their seeds): cannot estimate an "
                        "interval")
    assert v.detail() == ("Welch t, 2 vs 3 seeds: no spread between seeds (both groups are constant over their "
                          "seeds): cannot estimate an interval")
    assert v.format() == "+1.00 (no spread: undetermined)"
    assert compare_groups({0: 87.0, 1: 87.0}, {0: 87.0, 1: 87.0}).call == "undetermined"  # identical runs too
    # one constant group is fine: the other's spread gives the interval
    one = compare_groups({3: 88.0, 4: 88.0}, {0: 86.5, 1: 87.0, 2: 87.5})
    assert one.interval.estimable and one.call in ("gain", "tie")
    flat = welch_from_summary(88.0, 0.0, 3, 87.0, 0.0, 3)  # a published table with ± 0.00 on both rows
    assert not flat.estimable


def test_single_seed_is_unknown_with_its_reason():
    v = compare_groups({0: 91.0}, {0: 87.0, 1: 87.5, 2: 86.5})
    assert v.interval is None and v.welch is None and v.call == "unknown"
    assert v.format() == "+4.00 (n=1: unknown)"
    assert v.reason == v.detail() == "1 vs 3 seed(s): at least 2 of each are needed for an interval"
    both = compare_groups({0: 91.0}, {0: 90.0})  # one seed each: paired needs >= 2 pairs
    assert both.call == "unknown" and not both.paired


def test_report_shows_the_undetermined_call_and_its_reason():
    """The report's table cell and significance note (and the terminal table's call) say undetermined."""
    from types import SimpleNamespace

    from fusionkd.compare.report import DEFINITIONS, significance_notes

    v = compare_groups({0: 88.33, 1: 88.70, 2: 88.24}, {0: 87.33, 1: 87.70, 2: 87.24})
    g = SimpleNamespace(method="kd", gain_last=v, gain_best=None)
    (line,) = significance_notes([g])
    assert line == ("- `kd` vs `baseline`, last: +1.00 (no spread: undetermined) (paired t over 3 seeds: no spread "
                    "between seeds (every per-seed difference is +1.00): cannot estimate an interval, Welch p = "
                    f"{v.welch.p:.3f} (unpaired: not the test the call is made on))")
    assert "*undetermined* when the seeds show no spread" in DEFINITIONS
