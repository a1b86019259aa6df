"""Statistics of budget-to-failure over attackers: the median and the minimum, with
bootstrap confidence intervals stratified by attacker group.

A trial that never crossed phi (resisted, diverged) enters as +inf: its budget-to-failure
lies above T, so a median or a bound that lands on it reads "> T".

The bootstrap resamples each attacker group's trials (its seeds) with replacement, keeping
every group's size, and recomputes the median and the minimum over all trials. It measures
how much these numbers move with the seeds of *these* attackers, not how they would move
under other attackers: with one trial per group every resample is the sample itself and the
interval collapses to the point estimate. The percentile bootstrap of a minimum never goes
below the observed minimum; its upper end shows how much the worst case hinges on one seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0  # a fixed seed: the same records always give the same report


def median(values: Sequence[float]) -> float:
    """The median, +inf when it lies above T (averaging with +inf stays +inf); nan if empty."""
    if not values:
        return math.nan
    return float(np.median(np.asarray(values, dtype=float)))


def bootstrap_ci(groups: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{"median": (lo, hi), "min": (lo, hi)}: percentile intervals over `resamples` stratified
    resamples of `groups` (attacker group -> the budgets-to-failure of its trials, +inf for none).
    """
    groups = {g: np.asarray(v, dtype=float) for g, v in groups.items() if len(v)}
    if not groups:
        return {"median": (math.nan, math.nan), "min": (math.nan, math.nan)}
    rng = np.random.default_rng(seed)
    # one column block per group: row b of the result is resample b over all trials
    draws = np.concatenate(
        [v[rng.integers(0, len(v), size=(resamples, len(v)))] for _, v in sorted(groups.items())], axis=1)
    tail = (1 - level) / 2
    out = {}
    for name, stat in (("median", np.median(draws, axis=1)), ("min", draws.min(axis=1))):
        # no interpolation: a bound between a finite value and +inf would come out nan
        out[name] = (float(np.quantile(stat, tail, method="lower")),
                     float(np.quantile(stat, 1 - tail, method="higher")))
    return out
