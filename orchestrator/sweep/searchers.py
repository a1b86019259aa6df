"""The adversary as Tune sees it: a searcher per defence that suggests the next attacker, and
one Tune searcher that runs them side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from ray import tune
from ray.tune.search import Searcher

from orchestrator.spec.model import SweepSpec
from orchestrator.spec.space import attacker_id, decode, digest, searched
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


class Deduped(Searcher):
    """`inner`, never handing out an attacker whose id is in `seen` (the recorded ones) or that
    it handed out before: such a suggestion is closed at once as an error (the model learns
    nothing from it) and the inner searcher asked again, at most `tries` times a trial; then
    the search ends with one line to `note`. `attacker` maps a suggestion to its attacker id."""

    # An ask is one draw of the model (milliseconds). Twenty repeats in a row come from a model
    # settled on attackers already run, or a discrete space all but exhausted.
    def __init__(self, inner: Searcher, attacker: Callable[[dict], str], seen: Iterable[str] = (),
                 tries: int = 20, note: Callable[[str], None] | None = None) -> None:
        super().__init__(metric=Metric.OBJECTIVE, mode="min")
        self.inner, self.attacker, self.tries, self.note = inner, attacker, tries, note
        self.seen = set(seen)
        self.inner_id: dict[str, str] = {}
        self.handed = self.skipped = 0
        self.done = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec) or True

    def suggest(self, trial_id: str):
        if self.done:
            return Searcher.FINISHED
        for i in range(self.tries):
            # a fresh id for each ask: the inner searcher keeps each rejected one, closed as an error
            asked = trial_id if i == 0 else f"{trial_id}~{i}"
            config = self.inner.suggest(asked)
            if config is None or config is Searcher.FINISHED:
                return config
            key = self.attacker(config)
            if key not in self.seen:
                self.seen.add(key)
                self.inner_id[trial_id] = asked
                self.handed += 1
                return config
            self.skipped += 1
            self.inner.on_trial_complete(asked, result=None, error=True)
        self.done = True
        if self.note is not None:
            self.note(f"the searcher proposed only attackers already run ({self.tries} in a row); "
                      f"its search ends here, after {self.handed} new trials")
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.inner_id:
            self.inner.on_trial_result(self.inner_id[trial_id], result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if (asked := self.inner_id.pop(trial_id, None)) is not None:
            self.inner.on_trial_complete(asked, result=result, error=error)


def make(spec: SweepSpec, configs: list[dict] | None, priors: list[tuple[dict, float]],
         recorded: Iterable[str] = (), note: Callable[[str], None] | None = None) -> Searcher:
    """The defence's searcher: the fixed list `configs` (grid/random), else a model-based one
    (tpe/hyperopt) told the `priors` (encoded attacker, objective) recorded by earlier runs and
    never handing out an attacker whose id is in `recorded` (Deduped, which tells `note` if it
    ends the search)."""
    if configs is not None:
        return FixedTrials(configs)
    s = spec.search
    space = {name: _domain(d) for name, d in searched(spec.space).items()}
    # Every draw of a seeded searcher follows from its seed and what it was told: with the
    # first run's seed a resumed search would propose the first run's attackers again (its
    # random start replays them exactly), and Deduped would skip them one by one.
    seed = s.seed if not priors else int(digest([s.seed, len(priors)])[:8], 16)
    if s.algorithm == "tpe":
        import logging

        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_initial)
        inner: Searcher = OptunaSearch(space, metric=Metric.OBJECTIVE, mode="min", sampler=sampler,
                                       points_to_evaluate=[p for p, _ in priors] or None,
                                       evaluated_rewards=[r for _, r in priors] or None)
    else:
        inner = _hyperopt(space, priors, s.n_initial, seed)
    return Deduped(inner, lambda config: attacker_id(decode(spec.space, config)), recorded, note=note)


def _hyperopt(space: dict, priors: list[tuple[dict, float]], n_initial: int, seed: int) -> Searcher:
    """HyperOptSearch told `priors` as finished trials. Its points_to_evaluate would rerun them
    and it has no add_evaluated_point, so they go in as done hyperopt trials through set_state
    (hyperopt's own trial documents, the form it checkpoints)."""
    from hyperopt import STATUS_OK, Trials
    from hyperopt.base import JOB_STATE_DONE
    from hyperopt.fmin import generate_trial
    from ray.tune.search.hyperopt import HyperOptSearch

    searcher = HyperOptSearch(space, metric=Metric.OBJECTIVE, mode="min", n_initial_points=n_initial,
                              random_state_seed=seed)
    if priors:
        docs = [generate_trial(tid, dict(p)) for tid, (p, _) in enumerate(priors)]
        for doc, (_, value) in zip(docs, priors, strict=True):
            doc["state"], doc["result"] = JOB_STATE_DONE, {"loss": float(value), "status": STATUS_OK}
        trials = Trials()
        trials.insert_trial_docs(docs)
        trials.refresh()
        searcher.set_state({**searcher.get_state(), "hyperopt_trials": trials})
    return searcher


def _domain(d):
    if d.kind in ("grid", "choice"):
        return tune.choice(list(range(len(d.values))))
    lo, hi = d.values
    if d.kind == "randint":
        return tune.randint(int(lo), int(hi))
    return (tune.loguniform if d.kind == "loguniform" else tune.uniform)(lo, hi)
