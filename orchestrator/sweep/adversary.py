"""The adversary's objective and its progress: what a searcher minimises, and how fast it
found the cheapest successful attack."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainables.names import BUDGET_UNITS, SUCCESS


def objective(point: dict, unit: str, penalty: float, t_max: int) -> float:
    """The searcher's objective for a trial whose latest evaluation is `point`
    (provisional while the trial runs: as if it resisted).

    A trial's objective is its budget-to-failure in the search unit. An attack that did not
    succeed still has to tell the searcher something, so it enters with a penalty:

        failed / unsafe_at_release        objective = budget at the first crossing (in `unit`)
        resisted / diverged / degenerate  objective = penalty x T_max x (budget per step it spent)

    T_max is the longest horizon in the space, so a censored short attack never looks
    cheaper than a success of a long one in steps; in the other units the trial's own
    budget per step scales it (a resisted batch-64 attack costs more than a batch-8 one).
    With the default penalty 2 and unit steps that is 2 x T."""
    spent = float(point[BUDGET_UNITS[unit]])
    if point["status"] in SUCCESS:
        return spent
    per_step = spent / point["step"] if point["step"] else 0.0
    return penalty * t_max * per_step


def cannot_lower(safe: bool, spent: float, best: float) -> bool:
    """A trial safe so far that has already spent `best`, the cheapest success against its
    defence: any crossing it reaches lies beyond this budget, so it cannot lower that minimum
    (nor tie it). A trial that has crossed may still be refined to below `best`. With
    search.prune the stopper ends such a trial."""
    return safe and spent >= best


@dataclass
class Progress:
    """Best budget-to-failure so far against trials and compute, for one defence."""

    unit: str
    trials: int = 0
    compute: float = 0.0
    """Attacker compute spent by every finished trial, in `unit`."""
    best: float = math.inf
    """Cheapest successful attack so far (inf until the first success)."""

    def add(self, status: str, spent: float, btf: float | None) -> None:
        """Count a finished trial: the compute it spent, and its budget-to-failure if any."""
        self.trials += 1
        self.compute += spent
        if status in SUCCESS and btf is not None:
            self.best = min(self.best, btf)
