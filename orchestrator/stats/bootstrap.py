"""The interval of the worst case: a bootstrap of the minimum budget-to-failure over attackers,
stratified by attacker group. (The median and survival against budget are censoring-aware
estimates: orchestrator/stats/survival.py.)"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0  # a fixed seed: the same records always give the same report


def bootstrap_ci(groups: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{"min": (lo, hi)}: the percentile interval of the minimum over `resamples` stratified
    resamples of `groups` (attacker group -> the budgets-to-failure of its trials, +inf for none)."""
    groups = {g: np.asarray(v, dtype=float)  # pragma: no mutate (equivalent: numbers in, float() reads each end)
              for g, v in groups.items() if len(v)}
    if not groups:
        return {"min": (math.nan, math.nan)}
    rng = np.random.default_rng(seed)
    # one column block per group: row b of the result is resample b over all trials
    draws = np.concatenate(
        [v[rng.integers(len(v), size=(resamples, len(v)))] for _, v in sorted(groups.items())], axis=1)
    tail = (1 - level) / 2
    low = draws.min(axis=1)
    # no interpolation: a bound between a finite value and +inf would come out nan
    return {"min": (float(np.quantile(low, tail, method="lower")), float(np.quantile(low, 1 - tail, method="higher")))}
