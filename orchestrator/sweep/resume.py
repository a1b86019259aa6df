"""One defence's search as the sweep resumes it from its records: what is recorded, what is left."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.spec.model import Defence, SweepSpec
from orchestrator.spec.space import encode
from orchestrator.sweep.adversary import Progress
from orchestrator.sweep.keys import search_key, trial_key
from orchestrator.sweep.progress import Display
from orchestrator.tracking.writer import Tracker
from trainables.names import Metric, Tag


@dataclass
class DefenceSearch:
    """One defence's search as the sweep resumes it: what earlier runs recorded, what is left."""

    defence: Defence
    progress: Progress
    """Trials and compute recorded so far, and the cheapest success among them."""
    configs: list[dict] | None
    """grid/random: the attackers still to run; None for an adaptive search."""
    pending: int
    priors: list[tuple[dict, float]]
    """Adaptive searches: (encoded attacker, objective) of every recorded trial."""
    adversary: str
    """The MLflow run of the adversary's progress against this defence."""
    recorded: frozenset[str] = frozenset()
    """Adaptive searches: the attacker ids of every recorded trial, never handed out again."""


def prepare(spec: SweepSpec, defence: Defence, tracker: Tracker, done: set[str],
            echo: Callable[[str], None], display: Display | None = None) -> DefenceSearch | None:
    """One defence's search, resumed from its recorded trials (None when nothing is left)."""
    s, skey = spec.search, search_key(spec)
    prior = tracker.finished_trials(defence.name, skey)
    progress = Progress(s.unit)
    for run in prior:
        m = run.data.metrics
        progress.add(run.data.tags[Tag.STATUS], m.get(Metric.spent(s.unit), 0.0), m.get(Metric.btf(s.unit)))
    if spec.adaptive:
        configs, pending = None, max(0, s.num_samples - len(prior))
        recorded = len(prior)
    else:  # a grid trial counts as recorded by its attacker, even from a spec that since changed
        # random draws of discrete dimensions can repeat an attacker: the same trial, run once
        every = {trial_key(spec, {"defence": defence.name, **a}): a for a in spec.attackers()}
        configs = [a for key, a in every.items() if key not in done]
        pending = len(configs)
        recorded = len(every) - pending
    what = f"defence {defence.name!r}: {recorded} trials already recorded, {pending} to run"
    if display is not None:
        display.begin(defence.name, progress, recorded, pending)
    if s.max_compute and progress.compute >= s.max_compute:
        echo(f"{what}; compute cap already spent ({progress.compute:g} >= {s.max_compute:g} {s.unit})")
        if display is not None:
            display.end(defence.name)
        return None
    echo(what)
    if not pending:
        return None
    adversary = tracker.adversary_run(defence.name, skey, {
        "algorithm": s.algorithm, "unit": s.unit, "penalty": s.penalty,
        "max_compute": s.max_compute, "num_samples": s.num_samples, "n_initial": s.n_initial,
        "seed": s.seed})
    priors = [(a, r.data.metrics[Metric.OBJECTIVE]) for r in prior
              if Metric.OBJECTIVE in r.data.metrics and Tag.ATTACKER in r.data.tags
              and (a := encode(spec.space, json.loads(r.data.tags[Tag.ATTACKER]))) is not None]
    recorded_ids = frozenset(r.data.tags[Tag.ATTACKER_ID] for r in prior if Tag.ATTACKER_ID in r.data.tags)
    return DefenceSearch(defence, progress, configs, pending, priors, adversary, recorded_ids)
