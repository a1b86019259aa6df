"""The Tune stopper of a sweep's trials (Ray imported at the top: only fit.py imports this)."""

from __future__ import annotations

from ray import tune

from orchestrator.spec.model import SweepSpec
from orchestrator.sweep.adversary import cannot_lower
from orchestrator.sweep.loop import DEFENCE, SAFE
from orchestrator.sweep.resume import DefenceSearch
from trainables.names import BUDGET_UNITS, SUCCESS, TERMINAL


class Stopper(tune.Stopper):
    """A trial stops at its final status or the error it reported (the loop itself stops at the
    crossing, after refining it), and with search.prune once it can no longer lower its
    defence's worst case (its id then goes into `pruned`)."""

    def __init__(self, spec: SweepSpec, searches: list[DefenceSearch]) -> None:
        self.field = BUDGET_UNITS[spec.search.unit]
        self.best = {x.defence.name: x.progress.best for x in searches} if spec.search.prune else None
        self.pruned: set[str] = set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        status, best = result.get("status"), self.best
        if status in (*TERMINAL, "error"):
            if best is not None and status in SUCCESS:
                defence = result[DEFENCE]
                best[defence] = min(best[defence], float(result[self.field]))
            return True
        if best is not None and cannot_lower(bool(result.get(SAFE)), float(result[self.field]), best[result[DEFENCE]]):
            self.pruned.add(trial_id)
            return True
        return False

    def stop_all(self) -> bool:
        return False
