"""Budget-to-failure curves: expected values are worked out by hand in the comments."""

from __future__ import annotations

import math
import re
import statistics
import warnings

import numpy as np
import pytest

from orchestrator.stats.survival import Curve, Outcome, incidence


def trials(*pairs: tuple[float, str]) -> list[Outcome]:
    return [Outcome(float(t), k) for t, k in pairs]  # type: ignore[arg-type]


# Successes at 2, 4, 8; censored at 1, 1 (pruned early), 3 and 16 (own horizons).
MIXED = trials((1, "censored"), (1, "censored"), (2, "success"), (3, "censored"), (4, "success"),
               (8, "success"), (16, "censored"))

# Ties of every sort: two successes at 1; a success, a competing event and a censoring at 2.
TIED = trials((1, "success"), (1, "success"), (2, "success"), (2, "competing"), (2, "censored"),
              (3, "competing"), (4, "success"), (5, "censored"))


def test_kaplan_meier_censors_each_trial_at_its_own_horizon() -> None:
    c = incidence(MIXED)
    assert c.method == "kaplan-meier"
    assert c.times == [0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0]
    # just before: 7 at 0 and 1; at 2 the two censored at 1 are gone (5); 4 at 3; 3 at 4; 2 at 8; 1 at 16
    assert c.at_risk == [7, 7, 5, 4, 3, 2, 1]
    assert c.censored_times == [1.0, 3.0, 16.0]
    # t=2: 1 - 1/5 = 0.8; t=4: 0.8 * (1 - 1/3) = 0.5333; t=8: 0.5333 * (1 - 1/2) = 0.2667; flat at censorings
    expected = [1.0, 1.0, 0.8, 0.8, 0.8 * 2 / 3, 0.8 * 2 / 3 / 2, 0.8 * 2 / 3 / 2]
    assert c.surviving == pytest.approx(expected, abs=1e-12)
    assert c.median() == 8.0
    assert c.follow_up == 16.0
    # naive: every non-success is "never broken" (+inf); 4 of 7 never broken, so unbroken share at 8
    # is 4/7 = 0.571 against 0.267, and the naive median is +inf ("> T") where the KM median is 8
    naive = [2.0, 4.0, 8.0] + [math.inf] * 4
    assert sum(b > 8 for b in naive) / 7 == pytest.approx(4 / 7)
    assert abs(4 / 7 - c.at(8)) > 0.3
    assert statistics.median(naive) == math.inf


def test_aalen_johansen_with_ties_events_before_censorings() -> None:
    c = incidence(TIED)
    assert c.method == "aalen-johansen"
    assert c.times == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # the censoring at 2 is still at risk at 2: n = 8, 8, 6, 3, 2, 1
    assert c.at_risk == [8, 8, 6, 3, 2, 1]
    # all-cause S(t-) and F(t) += S(t-) * d_success / n:
    # t=1: F = 1 * 2/8 = 0.25;            S = 1 - 2/8 = 0.75
    # t=2: F = 0.25 + 0.75 * 1/6 = 0.375;  S = 0.75 * (1 - 2/6) = 0.5   (success and competing together)
    # t=3: F = 0.375 (competing only);     S = 0.5 * (1 - 1/3) = 1/3
    # t=4: F = 0.375 + (1/3) * 1/2 = 0.541667
    expected = [1.0, 0.75, 0.625, 0.625, 1 - (0.375 + 1 / 6), 1 - (0.375 + 1 / 6)]
    assert c.surviving == pytest.approx(expected, abs=1e-12)
    assert c.median() == 4.0
    # treating competing as censored (KM): t=1: 0.75; t=2: 0.75 * 5/6 = 0.625; t=4: 0.625 * 1/2 = 0.3125,
    # overstating success: 1 - 0.3125 = 0.6875 against 0.541667
    as_censored = incidence([Outcome(o.time, "censored" if o.kind == "competing" else o.kind) for o in TIED])
    assert as_censored.method == "kaplan-meier"
    assert as_censored.at(4) == pytest.approx(0.3125, abs=1e-12)
    assert c.at(4) - as_censored.at(4) > 0.14


def test_success_at_budget_zero_is_counted_at_zero() -> None:
    # KM: t=0: 1 - 2/5 = 0.6; t=2: 0.6 * (1 - 1/3) = 0.4; t=3 censored; t=4: 0.4 * (1 - 1/1) = 0
    km = incidence(trials((0, "success"), (0, "success"), (2, "success"), (3, "censored"), (4, "success")))
    assert km.times == [0.0, 2.0, 3.0, 4.0]
    assert km.surviving == pytest.approx([0.6, 0.4, 0.4, 0.0], abs=1e-12)
    assert km.at(-1) == 1.0 and km.at(0) == pytest.approx(0.6) and km.at(1.5) == pytest.approx(0.6)
    assert km.quantile(0.4) == 0.0
    # AJ: t=0: F = 1/4, S = 3/4; t=1: F = 1/4 + (3/4) * 1/3 = 0.5 (lifelines' own AJ drops the time-0 success)
    aj = incidence(trials((0, "success"), (1, "success"), (2, "competing"), (3, "censored")))
    assert aj.surviving == pytest.approx([0.75, 0.5, 0.5, 0.5], abs=1e-12)
    assert aj.median() == 1.0


def test_median_and_quantile() -> None:
    # t=1: 1 - 1/3 = 0.667 and nothing after: the median lies above the follow-up (3)
    above = incidence(trials((1, "success"), (2, "censored"), (3, "censored")))
    assert above.median() is None and above.follow_up == 3.0
    # t=1: 1 - 1/4 = 0.75; t=2: 0.75 * (1 - 1/3) = 0.5 exactly in arithmetic, a hair above in floats
    exact = incidence(trials((1, "success"), (2, "success"), (3, "censored"), (4, "censored")))
    assert exact.median() == 2.0
    assert exact.quantile(0.25) == 1.0  # lifelines' KM has 0.7500000000000001 at 1
    c = incidence(MIXED)  # incidence 0.2 at 2, 0.4667 at 4, 0.7333 at 8
    assert c.quantile(0.2) == 2.0  # 1 - 0.8 is 0.19999999999999996
    assert c.quantile(0.25) == 4.0
    assert c.quantile(0.5) == c.median() == 8.0
    assert c.quantile(0.8) is None
    assert c.quantile(0.0) == 0.0
    assert c.at(7.99) == pytest.approx(0.8 * 2 / 3) and c.at(1000) == pytest.approx(0.8 * 2 / 3 / 2)
    with pytest.raises(ValueError):
        c.quantile(1.5)


def loglog_band(f: float, var: float, level: float = 0.95) -> tuple[float, float]:
    """The log(-log) band of an incidence f with variance var (delta method), as a band of 1 - f."""
    spread = statistics.NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(var) / (f * abs(math.log(f)))
    f_low, f_high = (math.exp(-math.exp(math.log(-math.log(f)) + sign * spread)) for sign in (1, -1))
    return 1 - f_high, 1 - f_low


def _check_band(c: Curve) -> None:
    assert len(c.lower) == len(c.upper) == len(c.surviving) == len(c.times)
    for lo, s, hi in zip(c.lower, c.surviving, c.upper, strict=True):
        assert 0.0 <= lo <= s <= hi <= 1.0


def test_kaplan_meier_band_is_lifelines_band() -> None:
    from lifelines import KaplanMeierFitter

    for level in (0.95, 0.8):
        c = incidence(MIXED, level=level)
        _check_band(c)
        km = KaplanMeierFitter(alpha=1 - level).fit([o.time for o in MIXED], [o.kind == "success" for o in MIXED])
        ci = km.confidence_interval_.loc[c.times]
        assert c.lower == pytest.approx(ci.iloc[:, 0].tolist(), abs=1e-12)
        assert c.upper == pytest.approx(ci.iloc[:, 1].tolist(), abs=1e-12)
    assert incidence(MIXED, 0.8).upper[-1] < incidence(MIXED, 0.95).upper[-1]  # narrower at a lower level
    assert (c.lower[0], c.upper[0]) == (1.0, 1.0)  # nothing has happened yet: no spread


def test_aalen_johansen_band() -> None:
    c = incidence(TIED)
    _check_band(c)
    assert (c.lower[0], c.upper[0]) == (1.0, 1.0)
    assert c.lower[2] < c.surviving[2] < c.upper[2]
    assert (c.lower[3], c.upper[3]) == (c.lower[2], c.upper[2])  # competing only at 3: incidence unchanged
    # last trial succeeds alone (lifelines: nan there). knots 1..4, n = 4, 3, 2, 1; S before = 1, 3/4, 1/2, 1/2
    # F: 0 at 1 (competing); 3/4 * 1/3 = 1/4 at 2; 1/4 + 1/2 * 1/1 = 3/4 at 4.
    # Collett's variance at 4, F = 3/4, over the earlier knots:
    #   t=1 (d=1, n=4):  (3/4 - 0)^2 * 1/(4*3) = 3/64
    #   t=2 (d=d_s=1, n=3): (3/4 - 1/4)^2 * 1/(3*2) + (3/4)^2 * 1*2/27 - 2 * (1/2) * (3/4) * 1/9 = 1/24 + 1/24 - 1/12
    # var = 3/64; log(-log) band of F: exp(-exp(log(-log F) -+ z * sqrt(var) / (F |log F|)))
    last = incidence(trials((1, "competing"), (2, "success"), (3, "censored"), (4, "success")))
    assert last.surviving == pytest.approx([1.0, 1.0, 0.75, 0.75, 0.25], abs=1e-12)
    f, spread = 0.75, 1.959963984540054 * math.sqrt(3 / 64) / (0.75 * abs(math.log(0.75)))
    f_low, f_high = (math.exp(-math.exp(math.log(-math.log(f)) + sign * spread)) for sign in (1, -1))
    assert (last.lower[-1], last.upper[-1]) == pytest.approx((1 - f_high, 1 - f_low), abs=1e-12)
    assert last.lower[-1] < 0.05 and last.upper[-1] > 0.85  # about (0.039, 0.872), not collapsed onto 0.25
    # without ties or budget 0 lifelines' AJ neither jitters nor drops anything: the bands must agree
    from lifelines import AalenJohansenFitter

    untied = trials((1, "success"), (2, "competing"), (3, "success"), (4, "censored"), (5, "success"),
                    (6, "competing"), (7, "censored"), (8, "success"), (9, "censored"))
    c = incidence(untied)
    aj = AalenJohansenFitter(seed=0).fit([o.time for o in untied],
                                         [{"success": 1, "competing": 2}.get(o.kind, 0) for o in untied], 1)
    assert c.surviving == pytest.approx((1 - aj.cumulative_density_.iloc[:, 0]).tolist(), abs=1e-12)
    ci = 1 - aj.confidence_interval_.loc[1.0:].to_numpy()  # knot 0 has no band in lifelines (nan)
    assert c.lower[1:] == pytest.approx(ci.min(axis=1).tolist(), abs=1e-12)
    assert c.upper[1:] == pytest.approx(ci.max(axis=1).tolist(), abs=1e-12)


def test_deterministic_and_leaves_global_rng_alone() -> None:
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    first = incidence(TIED)
    assert (np.random.get_state()[1] == state).all()  # lifelines' jitter would reseed numpy globally
    np.random.seed(2)
    assert incidence(TIED) == first
    assert incidence(list(reversed(TIED))) == first


def test_edge_cases() -> None:
    empty = incidence([])
    assert (empty.n, empty.times, empty.surviving, empty.median(), empty.at(5)) == (0, [0.0], [1.0], None, 1.0)
    assert (empty.lower, empty.upper, empty.at_risk, empty.follow_up) == ([1.0], [1.0], [0], 0.0)

    censored = incidence(trials((4, "censored"), (16, "censored"), (16, "censored")))
    assert censored.surviving == [1.0, 1.0, 1.0] and censored.median() is None
    assert censored.censored_times == [4.0, 16.0]

    # no censoring: 1 - 1/3, then (2/3)(1 - 1/2) = 1/3, then 0
    broken = incidence(trials((3, "success"), (1, "success"), (2, "success")))
    assert broken.surviving == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-12)
    assert broken.median() == 2.0 and broken.quantile(1.0) == 3.0
    _check_band(broken)

    one = incidence([Outcome(5.0, "success")])
    assert (one.times, one.surviving, one.at_risk, one.median()) == ([0.0, 5.0], [1.0, 0.0], [1, 1], 5.0)
    assert incidence([Outcome(5.0, "censored")]).surviving == [1.0, 1.0]
    lost = incidence([Outcome(5.0, "competing")])
    assert (lost.method, lost.surviving, lost.lower, lost.upper) == ("aalen-johansen", [1.0, 1.0], [1.0] * 2, [1.0] * 2)

    for bad in ([Outcome(-1.0, "success")], [Outcome(math.nan, "success")], [Outcome(1.0, "error")]):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            incidence(bad)
    with pytest.raises(ValueError):
        incidence(MIXED, level=1.0)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_bad_input_is_refused_with_its_reason() -> None:
    for level in (0.0, 1.0, 1.5, -0.5):  # (0, 1) is open: level 0 or 1 has no band
        with pytest.raises(ValueError, match=exactly(f"level must be within (0, 1), got {level}")):
            incidence(MIXED, level=level)
    with pytest.raises(ValueError, match=exactly("level must be within (0, 1), got 1.0")):
        incidence([], level=1.0)
    with pytest.raises(ValueError, match=exactly("unknown outcome kind 'error'; known: success, censored, competing")):
        incidence([Outcome(1.0, "error")])  # type: ignore[arg-type]
    for time in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=exactly(f"outcome time must be finite and >= 0, got {time}")):
            incidence([Outcome(2.0, "success"), Outcome(time, "censored")])
    for q in (1.5, -0.1):
        with pytest.raises(ValueError, match=exactly(f"quantile q must be within [0, 1], got {q}")):
            incidence(MIXED).quantile(q)


def test_curve_fields() -> None:
    empty = incidence([])
    assert (empty.method, empty.censored_times, empty.level) == ("kaplan-meier", [], 0.95)
    assert incidence([], level=0.8).level == 0.8
    c = incidence(MIXED, level=0.8)
    assert (c.method, c.n, c.level) == ("kaplan-meier", 7, 0.8)
    assert c.at_risk == [7, 7, 5, 4, 3, 2, 1] and all(type(n) is int for n in c.at_risk)  # counts, not 7.0
    aj = incidence(TIED)
    assert (aj.method, aj.n, aj.level, aj.censored_times) == ("aalen-johansen", 8, 0.95, [2.0, 5.0])
    assert all(type(n) is int for n in aj.at_risk)


def test_quantile_within_its_float_slack() -> None:
    c = incidence(MIXED)  # incidence 0 at 0 and 1, 0.2 at 2
    assert c.quantile(1e-12) == 0.0  # 0 is within the 1e-12 slack of q = 1e-12: reached at once
    assert c.quantile(2e-12) == 2.0  # 1e-12 short of it is not


def test_a_torn_curve_is_refused_not_read_short() -> None:
    torn = Curve("kaplan-meier", [0.0, 1.0], [1.0], [1.0], [1.0], [1, 1], [], 1, 0.95)
    with pytest.raises(ValueError, match="zip"):
        torn.quantile(1.0)


def test_aalen_johansen_last_knot_bands_by_hand() -> None:
    # successes at 1 and 2, the last trial competing at 3 (lifelines' variance is nan there: n - d = 0).
    # Nothing new of success at 3, so the band of 2 is kept as it is. n = 3, 2, 1; S before = 1, 2/3, 1/3;
    # F = 1/3 at 1, 1/3 + (2/3) * 1/2 = 2/3 at 2. Collett's variance at 2:
    #   t=1 (d = d_s = 1, n = 3):  (2/3 - 1/3)^2 * 1/(3*2) + 1 * 1*2/27 - 2 * (1/3) * 1 * 1/9 = 1/54
    #   t=2 (its own terms but one vanish): (2/3)^2 * 1*1/8 = 3/54;  var = 4/54 = 2/27
    kept = incidence(trials((1, "success"), (2, "success"), (3, "competing")))
    assert kept.surviving == pytest.approx([1.0, 2 / 3, 1 / 3, 1 / 3], abs=1e-12)
    assert (kept.lower[2], kept.upper[2]) == pytest.approx(loglog_band(2 / 3, 2 / 27), abs=1e-12)
    assert (kept.lower[3], kept.upper[3]) == (kept.lower[2], kept.upper[2])  # kept, not recomputed
    # competing at 1 then the last trial succeeds alone at 2: F = 0 at 1 and 1/2 at 2 (S before = 1/2, n = 1);
    # variance at 2 over knot 1 (d = 1 competing, n = 2): (1/2 - 0)^2 * 1/(2*1) = 1/8
    last = incidence(trials((1, "competing"), (2, "success")))
    assert last.surviving == pytest.approx([1.0, 1.0, 0.5], abs=1e-12)
    assert (last.lower[-1], last.upper[-1]) == pytest.approx(loglog_band(0.5, 1 / 8), abs=1e-12)
    # success at 1 (its band is lifelines' own), competing at 2, censored at 3, the last succeeds alone at 4:
    # n = 4, 3, 2, 1 at knots 1..4; S before = 1, 3/4, 1/2, 1/2; F = 1/4, 1/4, 1/4, 1/4 + 1/2 = 3/4
    #   t=1 (d = d_s = 1, n = 4):  (3/4 - 1/4)^2 * 1/(4*3) + 1 * 1*3/64 - 2 * (1/2) * 1 * 1/16 = 1/192
    #   t=2 (d = 1 competing, n = 3): (1/2)^2 * 1/(3*2) = 1/24;  var = 1/192 + 8/192 = 3/64
    late = incidence(trials((1, "success"), (2, "competing"), (3, "censored"), (4, "success")))
    assert late.surviving == pytest.approx([1.0, 0.75, 0.75, 0.75, 0.25], abs=1e-12)
    assert (late.lower[-1], late.upper[-1]) == pytest.approx(loglog_band(0.75, 3 / 64), abs=1e-12)
    # at 1 itself only S^2 d_s (n - d_s) / n^3 = 1 * 1*3/64 is left
    assert (late.lower[1], late.upper[1]) == pytest.approx(loglog_band(0.25, 3 / 64), abs=1e-12)


def test_aalen_johansen_band_is_lifelines_own_number_on_untied_data() -> None:
    """Without ties or budget 0 the relabelling changes nothing: at each knot the band is the very
    number lifelines gives there (its row at 2k+2, not a neighbour's that agrees to rounding)."""
    from lifelines import AalenJohansenFitter

    kinds = ["success", "success", "competing", "success", "competing", "competing", "success", "censored"]
    untied = [Outcome(float(i), k) for i, k in enumerate(kinds, start=1)]  # type: ignore[arg-type]
    for level in (0.95, 0.8):
        c = incidence(untied, level=level)
        aj = AalenJohansenFitter(alpha=1 - level).fit([o.time for o in untied],
                                                       [{"success": 1, "competing": 2}.get(k, 0) for k in kinds], 1)
        ci = aj.confidence_interval_.to_numpy()[1:]  # knot 0 has no band in lifelines (nan)
        assert c.lower[1:] == (1 - ci.max(axis=1)).tolist()
        assert c.upper[1:] == (1 - ci.min(axis=1)).tolist()
    assert incidence(untied, 0.8).upper[3] < incidence(untied, 0.95).upper[3]  # narrower at a lower level


def test_float_errors_inside_lifelines_do_not_reach_a_strict_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from lifelines import AalenJohansenFitter

    expected, fit = incidence(TIED), AalenJohansenFitter.fit

    def strict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _ = np.log(np.zeros(1)) + np.ones(1) / np.zeros(1)  # log(0) as at F = 0, x / 0 as at n - d = 0, -inf + inf
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AalenJohansenFitter, "fit", strict)
    with np.errstate(all="raise"):
        assert incidence(TIED) == expected
        assert np.geterr()["divide"] == "raise"


def test_only_lifelines_arithmetic_and_deprecation_warnings_are_silenced(monkeypatch: pytest.MonkeyPatch) -> None:
    from lifelines import AalenJohansenFitter

    expected, fit = incidence(TIED), AalenJohansenFitter.fit

    def noisy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        warnings.warn("invalid value in log", RuntimeWarning, stacklevel=1)
        warnings.warn("will change", FutureWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AalenJohansenFitter, "fit", noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert incidence(TIED) == expected
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "something else")]


def test_lifelines_jitter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Relabelled budgets never tie; if lifelines still found ties it would jitter them at random: refused."""
    from lifelines import AalenJohansenFitter

    fit = AalenJohansenFitter.fit

    def tied(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        warnings.warn("Tied event times were detected. The Aalen-Johansen estimator cannot handle tied event "
                      "times.", Warning, stacklevel=1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AalenJohansenFitter, "fit", tied)
    with pytest.raises(Warning, match="^Tied event times were detected"):
        incidence(TIED)
