"""Budget-to-failure as a survival curve: the share of attacks not yet successful at each budget."""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

Kind = Literal["success", "censored", "competing"]
KINDS: tuple[Kind, ...] = ("success", "censored", "competing")
SEED = 0  # lifelines' jitter seed; relabelling leaves it nothing to jitter, the seed is a backstop
_EPS = 1e-12  # float slack when comparing with q: lifelines' KM gives 3/4 as 0.7500000000000001


@dataclass(frozen=True)
class Outcome:
    time: float
    kind: Kind


@dataclass(frozen=True)
class Curve:
    method: Literal["kaplan-meier", "aalen-johansen"]
    times: list[float]  # knots from 0.0, one per distinct budget observed
    surviving: list[float]  # share not yet successful just after each knot
    lower: list[float]  # pointwise band of `surviving` at `level`
    upper: list[float]
    at_risk: list[int]  # trials still at risk just before each knot
    censored_times: list[float]  # distinct budgets at which trials were censored (plot marks)
    n: int
    level: float

    def at(self, t: float) -> float:
        """Surviving share at budget t: right-continuous steps, 1.0 before 0, flat after follow-up."""
        i = bisect.bisect_right(self.times, t) - 1
        return 1.0 if i < 0 else self.surviving[i]

    def quantile(self, q: float) -> float | None:
        """Smallest budget at which the cumulative incidence of success reaches q; None above follow-up."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile q must be within [0, 1], got {q}")
        return next((t for t, s in zip(self.times, self.surviving, strict=True) if 1 - s >= q - _EPS), None)

    def median(self) -> float | None:
        """Smallest budget at which surviving <= 0.5; None: the median lies above follow-up."""
        return self.quantile(0.5)

    @property
    def follow_up(self) -> float:
        """The largest budget observed, of any kind (0.0 with no trials)."""
        return self.times[-1]


def incidence(outcomes: Sequence[Outcome], level: float = 0.95) -> Curve:
    """The curve of the share of attacks not yet successful over budget (see the module docstring)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be within (0, 1), got {level}")
    for o in outcomes:
        if o.kind not in KINDS:
            raise ValueError(f"unknown outcome kind {o.kind!r}; known: {', '.join(KINDS)}")
        if not (math.isfinite(o.time) and o.time >= 0):
            raise ValueError(f"outcome time must be finite and >= 0, got {o.time}")
    if not outcomes:
        return Curve("kaplan-meier", [0.0], [1.0], [1.0], [1.0], [0], [], 0, level)

    t = np.array([float(o.time) for o in outcomes])
    kind = np.array([o.kind for o in outcomes])
    knots = np.unique(np.append(t, 0.0))
    k = np.searchsorted(knots, t)  # exact: every time is a knot
    count = {name: np.bincount(k[kind == name], minlength=len(knots)) for name in KINDS}
    at_risk = len(t) - np.searchsorted(np.sort(t), knots)  # trials whose budget is not below the knot

    if not count["competing"].any():
        method: Literal["kaplan-meier", "aalen-johansen"] = "kaplan-meier"
        surviving, lower, upper = _kaplan_meier(t, kind == "success", knots, level)
    else:
        method = "aalen-johansen"
        d_s, d = count["success"], count["success"] + count["competing"]
        cif, s_before = _aalen_johansen(d_s, d, at_risk)
        surviving = 1.0 - cif
        lower, upper = _aj_band(k, kind, len(knots), level)
        # every trial left succeeded at the last budget (F < 1 there: a competing event took its share)
        if math.isnan(lower[-1]) and cif[-1] > 0:
            lower[-1], upper[-1] = _last_band(cif, s_before, d_s, d, at_risk, level)

    # no band (nan) collapses onto the point; the bands (log(-log)) and the share lie within [0, 1]
    lower, upper = np.fmin(lower, surviving), np.fmax(upper, surviving)
    return Curve(method, knots.tolist(), surviving.tolist(), lower.tolist(), upper.tolist(),
                 at_risk.astype(int).tolist(), sorted(set(t[kind == "censored"].tolist())), len(t), level)


def _kaplan_meier(t: np.ndarray, success: np.ndarray, knots: np.ndarray,
                  level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lifelines' KM of success (handles ties and budget 0 itself) and its band, at the knots."""
    from lifelines import KaplanMeierFitter  # lazy: pulls in matplotlib and autograd

    km = KaplanMeierFitter(alpha=1 - level).fit(t, event_observed=success)
    s = km.survival_function_.iloc[:, 0].loc[knots].to_numpy()  # its timeline is the knots: 0 and every time
    ci = km.confidence_interval_.loc[knots].to_numpy()
    return s, ci.min(axis=1), ci.max(axis=1)


def _aalen_johansen(d_s: np.ndarray, d: np.ndarray, at_risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The AJ cumulative incidence of success after each knot, events at a knot taken together, and the
    all-cause KM survival just before each knot."""
    s_after = np.cumprod(1 - d / at_risk)  # at_risk >= 1: every knot but 0 is some trial's time, and 0 has all n
    s_before = np.concatenate(([1.0], s_after[:-1]))
    return np.cumsum(s_before * d_s / at_risk), s_before


def _aj_band(k: np.ndarray, kind: np.ndarray, m: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """lifelines' AJ band (Collett's variance), on the relabelled budgets, as a band of `surviving`."""
    from lifelines import AalenJohansenFitter

    slot = np.where(kind == "success", 2.0 * k + 1, 2.0 * k + 2)
    # 0 (censored) is np.select's default, and lifelines counts every code but 0 and 1 as competing
    code = np.select([kind == "success", kind == "competing"], [1, 2], 0)  # pragma: no mutate (equivalent, see above)
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # it divides by n - d = 0 on a last row
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # it would jitter the ties: not deterministic (the message is matched ignoring case)
        warnings.filterwarnings("error", message="Tied event times")  # pragma: no mutate (equivalent, see above)
        # the seed is never read (the tie warning raises before any jitter); the variance is lifelines' default
        aj = AalenJohansenFitter(seed=SEED, calculate_variance=True,  # pragma: no mutate (equivalent, see above)
                                 alpha=1 - level)
        aj.fit(slot, code, event_of_interest=1)
    cif = aj.cumulative_density_.iloc[:, 0].to_numpy()
    ci = aj.confidence_interval_.to_numpy()
    lo, hi = ci.min(axis=1), ci.max(axis=1)  # nan stays nan
    for i in range(1, len(cif)):  # pragma: no mutate (equivalent: rows 0 and 1 could only go from nan to nan)
        if math.isnan(lo[i]) and cif[i] == cif[i - 1]:  # nothing new of success here: same variance
            lo[i], hi[i] = lo[i - 1], hi[i - 1]
    index = aj.cumulative_density_.index.to_numpy()
    row = np.searchsorted(index, 2.0 * np.arange(m) + 2, side="right") - 1  # last row at or before 2k+2
    # a band of the cumulative incidence F turns into one of 1 - F with its ends swapped
    return 1 - hi[row], 1 - lo[row]


def _last_band(cif: np.ndarray, s_before: np.ndarray, d_s: np.ndarray, d: np.ndarray, at_risk: np.ndarray,
               level: float) -> tuple[float, float]:
    """Collett's variance (lifelines' formula) at a last knot where every trial left succeeded, as a band of 1 - F.

    lifelines divides by n - d = 0 there and gets nan; that knot's own terms are (F - F)^2 * d / (n (n - d)),
    zero in the limit, and two that vanish with d_s = n, so the sum runs over the knots before it.
    """
    f, gap = cif[-1], cif[-1] - cif[:-1]
    n, d, d_s, s = at_risk[:-1], d[:-1], d_s[:-1], s_before[:-1]
    var = np.sum(gap**2 * d / (n * (n - d)) + s**2 * d_s * (n - d_s) / n**3 - 2 * gap * s * d_s / n**2)
    spread = NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(max(var, 0.0)) / (f * abs(math.log(f)))
    low_f, high_f = (math.exp(-math.exp(math.log(-math.log(f)) + sign * spread)) for sign in (1, -1))
    return 1 - high_f, 1 - low_f
