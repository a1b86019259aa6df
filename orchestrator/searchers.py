"""The adversary as Tune sees it: a searcher per defence that suggests the next attacker, and
one Tune searcher that runs them side by side.

    searcher = Capped(make(spec, configs, priors), "step", cap=400.0, spent_before=0.0)
    tuner_searcher = SideBySide({"base": (searcher, 16), "repnoise": (other, 16)})

grid/random hand Tune a precomputed list (FixedTrials); tpe (Optuna) and hyperopt model the
objective over the space's searched dimensions, categorical ones as indices (orchestrator/space.py
encodes and decodes them). Capped wraps any of them so that no trial starts once the defence's
compute cap is spent.

Ray is imported at this module's top: import it only where Tune runs (sweep._fit).
"""

from __future__ import annotations

import math

from ray import tune
from ray.tune.search import Searcher

from orchestrator.space import searched
from orchestrator.spec import SweepSpec
from trainables.names import Metric


class FixedTrials(Searcher):
    """Hands Tune a precomputed list of attackers."""

    def __init__(self, configs: list[dict]):
        super().__init__(metric=Metric.OBJECTIVE, mode="min")
        self._configs = list(configs)

    def suggest(self, trial_id: str):
        return self._configs.pop(0) if self._configs else Searcher.FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False) -> None:
        pass


class Capped(Searcher):
    """`inner`, starting no trial once the defence's compute cap is spent (trials in flight
    finish: the cap can be overshot by up to max_concurrent trials). `field` is the result key
    of the cap's unit; `spent_before` what earlier runs of this search spent."""

    def __init__(self, inner: Searcher, field: str, cap: float | None, spent_before: float) -> None:
        super().__init__(metric=Metric.OBJECTIVE, mode="min")
        self.inner, self.field, self.cap, self.spent_before = inner, field, cap, spent_before
        self.spent: dict[str, float] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec) or True

    def suggest(self, trial_id: str):
        if self.cap is not None and self.spent_before + sum(self.spent.values()) >= self.cap:
            return Searcher.FINISHED
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._count(trial_id, result)
        self.inner.on_trial_result(trial_id, result)

    def _count(self, trial_id: str, result: dict | None) -> None:
        value = float((result or {}).get(self.field) or 0.0)
        if math.isfinite(value):
            self.spent[trial_id] = max(self.spent.get(trial_id, 0.0), value)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self._count(trial_id, result)  # Tune skips on_trial_result for the result that stops a trial
        if result and result.get("status") == "error":  # the trial's own exception (trial.run_trial)
            result, error = None, True
        self.inner.on_trial_complete(trial_id, result=result, error=error)


class SideBySide(Searcher):
    """One searcher per defence behind one Tune run, so that trials against every defence share
    the slots (a defence's tail no longer leaves them idle). Each suggestion goes to the defence
    with the fewest trials in flight (then the fewest started, then the one listed first) that
    still has trials to run, and
    carries {"defence": name}; each defence's searcher hears only of its own trials, so an
    adaptive adversary still learns from its own defence alone. `searchers` maps each defence to
    (its searcher, the trials it may still start)."""

    def __init__(self, searchers: dict[str, tuple[Searcher, int]]) -> None:
        super().__init__(metric=Metric.OBJECTIVE, mode="min")
        self.searchers = {d: s for d, (s, _) in searchers.items()}
        self.left = {d: n for d, (_, n) in searchers.items()}
        self.started = dict.fromkeys(self.searchers, 0)
        self.owner: dict[str, str] = {}
        self.finished: set[str] = set()

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, config, **spec) or True
                    for s in self.searchers.values()])

    def in_flight(self, defence: str) -> int:
        return sum(d == defence for d in self.owner.values())

    def suggest(self, trial_id: str):
        order = list(self.searchers)
        open_ = [d for d in order if d not in self.finished and self.left[d] > 0]
        for defence in sorted(open_, key=lambda d: (self.in_flight(d), self.started[d], order.index(d))):
            config = self.searchers[defence].suggest(trial_id)
            if config is Searcher.FINISHED:
                self.finished.add(defence)
            elif config is not None:  # None: that searcher is not ready; another defence's may be
                self.left[defence] -= 1
                self.started[defence] += 1
                self.owner[trial_id] = defence
                return {**config, "defence": defence}
        return Searcher.FINISHED if all(d in self.finished or self.left[d] <= 0 for d in order) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if (defence := self.owner.pop(trial_id, None)) is not None:
            self.searchers[defence].on_trial_complete(trial_id, result=result, error=error)


def make(spec: SweepSpec, configs: list[dict] | None, priors: list[tuple[dict, float]]) -> Searcher:
    """The defence's searcher: the fixed list `configs` (grid/random), else a model-based one
    (tpe/hyperopt) told the `priors` (encoded attacker, objective) recorded by earlier runs."""
    if configs is not None:
        return FixedTrials(configs)
    s = spec.search
    space = {name: _domain(d) for name, d in searched(spec.space).items()}
    if s.algorithm == "tpe":
        import logging

        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_initial)
        return OptunaSearch(space, metric=Metric.OBJECTIVE, mode="min", sampler=sampler,
                            points_to_evaluate=[p for p, _ in priors] or None,
                            evaluated_rewards=[r for _, r in priors] or None)
    from ray.tune.search.hyperopt import HyperOptSearch

    # HyperOpt cannot be told past results without rerunning them: a resumed search
    # keeps its records and its count, but its model starts afresh.
    return HyperOptSearch(space, metric=Metric.OBJECTIVE, mode="min", n_initial_points=s.n_initial,
                          random_state_seed=s.seed)


def _domain(d):
    if d.kind in ("grid", "choice"):
        return tune.choice(list(range(len(d.values))))
    lo, hi = d.values
    if d.kind == "randint":
        return tune.randint(int(lo), int(hi))
    return (tune.loguniform if d.kind == "loguniform" else tune.uniform)(lo, hi)
