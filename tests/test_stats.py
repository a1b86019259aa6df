"""The interval of the worst case (orchestrator/stats/bootstrap.py), against hand-computed resampling
probabilities: a percentile of the minimum over stratified resamples, reproducible from its seed."""

import math

import pytest

from orchestrator.stats.bootstrap import bootstrap_ci

INF = math.inf


def test_each_group_is_resampled_within_itself():
    """Group a always contributes its 5; group b's two draws are both inf with probability 1/4, so
    a quarter of the resampled minima read 5 and the rest 3: the 95% interval is [3, 5]. Pooled into
    one group, all three draws would be inf with probability 1/27 > 2.5%, and the upper end inf."""
    assert bootstrap_ci({"a": [5.0], "b": [3.0, INF]}) == {"min": (3.0, 5.0)}
    assert bootstrap_ci({"all": [5.0, 3.0, INF]}) == {"min": (3.0, INF)}


def test_an_attacker_whose_seeds_mostly_resisted_reaches_inf_at_the_upper_end():
    # one group [1, inf, inf]: the minimum of 3 draws is inf with probability 8/27, 1 otherwise
    assert bootstrap_ci({"g": [1.0, INF, INF]}) == {"min": (1.0, INF)}
    # [1, inf] at level 0.2: the 40% and 60% points of minima that are 1 with probability 3/4
    assert bootstrap_ci({"g": [1.0, INF]}, level=0.2) == {"min": (1.0, 1.0)}


def test_one_trial_per_group_collapses_to_the_minimum_and_no_trials_to_nan():
    assert bootstrap_ci({"a": [7.0], "b": [4.0], "c": [INF]}) == {"min": (4.0, 4.0)}
    lo, hi = bootstrap_ci({})["min"]
    assert math.isnan(lo) and math.isnan(hi)
    assert bootstrap_ci({"a": [], "b": [2.0]}) == {"min": (2.0, 2.0)}   # an empty group adds nothing


def test_the_interval_is_fixed_by_its_seed():
    """Few resamples of spread-out budgets, so that the interval moves with the draws: premise, other
    seeds give other intervals; the same seed, in fresh calls, always the same one."""
    groups = {"g": [float(v) for v in range(1, 41)], "h": [float(v) for v in range(3, 60, 2)]}
    by_seed = {seed: bootstrap_ci(groups, resamples=8, seed=seed, level=0.5) for seed in range(12)}
    assert len({ci["min"] for ci in by_seed.values()}) > 1
    for seed, ci in by_seed.items():
        assert all(bootstrap_ci(groups, resamples=8, seed=seed, level=0.5) == ci for _ in range(5)), seed
    assert bootstrap_ci(groups) == bootstrap_ci(groups)   # the default seed too


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_the_lower_end_never_goes_below_the_observed_minimum(level):
    lo, hi = bootstrap_ci({"g": [4.0, 9.0, 30.0], "h": [12.0, INF]}, level=level)["min"]
    assert 4.0 <= lo <= hi


def test_each_end_is_its_own_tail_of_the_minima():
    """[1, inf]: the minimum of 2 draws is inf with probability 1/4. At level 0.4 the ends are the 30%
    and 70% points, both below 3/4: (1, 1); at level 0.6 the 20% and 80% points: the upper is inf."""
    assert bootstrap_ci({"g": [1.0, INF]}, level=0.4) == {"min": (1.0, 1.0)}
    assert bootstrap_ci({"g": [1.0, INF]}, level=0.6) == {"min": (1.0, INF)}


def test_the_ends_are_observed_minima_never_interpolated():
    """Two resamples of [1, 2]: each minimum is 1 or 2 (1 with probability 3/4). Where the two differ
    the 2.5% and 97.5% points are 1 and 2 themselves, never a budget between them."""
    ends = [bootstrap_ci({"g": [1.0, 2.0]}, resamples=2, seed=seed)["min"] for seed in range(12)]
    assert (1.0, 2.0) in ends   # premise: some seeds draw both minima
    assert all(lo in (1.0, 2.0) and hi in (1.0, 2.0) for lo, hi in ends)
