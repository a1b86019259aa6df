"""A sweep's cost in steps and examples, before it runs: each trial's plan (stages, batches,
horizon, evaluation gaps, refinement replays) as the loop will run it, and the whole sweep's sum.
`attack-sweep validate` prints it; docs/troubleshooting.md ("Budget notes") explains the notes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from orchestrator.echo import amount
from orchestrator.spec.model import SpecError, SweepSpec
from orchestrator.spec.space import as_json
from trainables.config import AttackConfig, Attacker, Stage
from trainables.messages import explain, field_at

MAX_TRIAL_STEPS = 100_000
"""A trial horizon beyond this many steps gets a note: published fine-tuning attacks run tens to a
few thousand steps, and at a typical 0.1-1 s per step 100,000 steps are already hours to a day of
one trial; a larger T is most often a typo (1e9 for 1e3)."""
MAX_SWEEP_STEPS = 1_000_000
"""A whole sweep of more than this many steps gets a note: ten trials at MAX_TRIAL_STEPS, 1 to 12
device-days at the 0.1-1 s per step of a real model."""
PLANNED = ("steps", "stages", "batch_size", "dataset_size", "attack_domain")
"""The attacker fields that set a trial's plan: what an adaptive search's possible attackers vary."""
_EXACT_GAPS = 100_000
"""Evaluation points listed one by one up to this many; beyond, the widest gap is bounded by eval_every."""


@dataclass(frozen=True)
class Plan:
    """One trial of the sweep (any defence: the plan does not depend on it), as the loop runs it."""

    attacker: dict[str, Any]
    cfg: AttackConfig

    @property
    def stages(self) -> list[tuple[Stage, Attacker]]:
        """Each stage with the attacker as it trains there (its overrides applied)."""
        return [(s, s.resolved(self.cfg.attacker)) for s in self.cfg.stages]

    @property
    def horizon(self) -> int:
        return self.cfg.horizon

    @property
    def set_by(self) -> str:
        """The field that sets T: space.stages, space.steps or max_steps."""
        atk = self.cfg.attacker
        return "space.stages" if atk.stages else "space.steps" if atk.steps else "max_steps"

    @property
    def examples(self) -> int:
        """Examples the budget counts over T: each stage's steps x its batch."""
        return sum(s.steps * hp.batch_size for s, hp in self.stages)

    def eval_points(self) -> list[int] | None:
        """Where f is scored (cfg.eval_steps()), or None where they are too many to list."""
        c = self.cfg
        if c.eval_schedule == "every" and self.horizon // c.eval_every > _EXACT_GAPS:
            return None
        return c.eval_steps()

    @property
    def gap(self) -> int:
        """The widest gap between two evaluation points: the most steps a crossing can hide in."""
        points = self.eval_points()
        if points is None:
            return self.cfg.eval_every
        return max(b - a for a, b in itertools.pairwise(points))

    @property
    def replays(self) -> int:
        """Most steps refinement can replay after a crossing: round k retrains half of the window
        left (the lower half, from the last safe point's snapshot), up to cfg.refine rounds."""
        window, total = self.gap, 0
        for _ in range(self.cfg.refine):
            if window <= 1:
                break
            total += window // 2
            window -= window // 2  # the upper half is the wider one: the worst case
        return total

    @property
    def cost_steps(self) -> int:
        """Most optimizer steps the trial runs: T, plus the replays of one refined crossing."""
        return self.horizon + self.replays

    @property
    def cost_examples(self) -> int:
        return self.examples + self.replays * max(hp.batch_size for _, hp in self.stages)


def plans(spec: SweepSpec) -> tuple[list[Plan], bool]:
    """Each trial's plan, and whether they are exact: for grid/random the attackers the sweep runs;
    for an adaptive search one per combination of the PLANNED dimensions' values (a range by its two
    ends): the attackers it may pick."""
    from orchestrator.sweep import attack_config  # the trial's own config: its stages and schedule

    exact, found, errors = not spec.adaptive, [], []
    for attacker in spec.attackers() if exact else _possible(spec):
        try:
            found.append(Plan(attacker, attack_config(spec, {"defence": spec.base.name, **attacker})))
        except ValidationError as err:  # grid/random: preflight checked every config before
            errors.append(err.errors()[0])
    if not found:
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "attacker"
        raise SpecError(f"spec error: space: no attacker the search can pick makes a valid trial; {where}: "
                        f"{explain(first, field_at(AttackConfig, first['loc']))}")
    return found, exact


def _possible(spec: SweepSpec) -> list[dict[str, Any]]:
    dims = dict(spec.space)

    def options(d) -> tuple:
        if d.kind == "randint":
            return (int(d.values[0]), int(d.values[1]) - 1)
        return d.values

    first = {n: options(d)[0] for n, d in dims.items()}
    out = []
    for combo in itertools.product(*(options(dims[n]) for n in PLANNED)):
        try:
            out.append(as_json({**first, **dict(zip(PLANNED, combo, strict=True))}))
        except ValueError:  # e.g. a uniform domain over an integer field: the trial's own error
            continue
    return out


@dataclass(frozen=True)
class Cost:
    """The most the whole sweep trains: every trial to its T, each crossing refined in its widest gap."""

    trials: int
    steps: int
    examples: int
    replays: int
    """Steps of refinement replays included in `steps`."""
    benign_steps: int = 0
    """Steps of the conditions' benign fine-tunes (one per defence), beside the attacks."""

    @property
    def trained(self) -> int:
        """Every step the sweep trains: attacks and benign fine-tunes."""
        return self.steps + self.benign_steps


def cost(spec: SweepSpec, found: list[Plan], exact: bool) -> Cost:
    """The whole sweep's cost (steps, examples), per defence x the defences."""
    d = len(spec.defences)
    if exact:
        steps, examples = sum(p.cost_steps for p in found), sum(p.cost_examples for p in found)
        replays, trials = sum(p.replays for p in found), len(found)
    else:  # the search may pick its costliest attacker every time
        trials = spec.search.num_samples
        steps, examples = trials * max(p.cost_steps for p in found), trials * max(p.cost_examples for p in found)
        replays = trials * max(p.replays for p in found)
    benign = 0
    if spec.conditions and spec.conditions.trainability:
        from orchestrator.conditions.jobs import benign_config  # the benign run's own config

        b = Plan({}, benign_config(spec, spec.base))
        benign = b.cost_steps
    return Cost(trials * d, steps * d, examples * d, replays * d, benign * d)


def size_notes(spec: SweepSpec, found: list[Plan], total: Cost) -> list[str]:
    """Notes on a trial or a sweep beyond MAX_TRIAL_STEPS / MAX_SWEEP_STEPS."""
    longest = max(found, key=lambda p: p.horizon)
    t = longest.horizon
    if t > MAX_TRIAL_STEPS:
        field = {"max_steps": f"max_steps: {spec.max_steps}", "space.steps": f"space.steps: {t}",
                 "space.stages": f"space.stages: {t} steps in all"}[longest.set_by]
        return [f"{field}: a trial may run up to {amount(t)} steps (beyond {MAX_TRIAL_STEPS:,}: longer than "
                f"fine-tuning attacks run, most often a typo); lower {longest.set_by}"]
    if total.steps > MAX_SWEEP_STEPS:
        return [f"whole sweep: at most {amount(total.steps)} steps over {total.trials} trials (beyond "
                f"{MAX_SWEEP_STEPS:,}); lower max_steps or run fewer attackers"]
    return []


def scored(spec: SweepSpec, found: list[Plan], exact: bool) -> str:
    """Where f is scored, as the loop does it (AttackConfig.eval_steps): the schedule's steps, every
    stage's end and T, so an eval_every beyond T leaves step 0 and T (and the stages' ends)."""
    ends = ", at each stage's end" if any(p.cfg.attacker.stages for p in found) else ""
    if spec.eval_schedule == "geometric":
        return f"at steps 0, 1, 2, 4, ...{ends} and at T"
    e = spec.eval_every
    short = [p for p in found if p.horizon < e]
    if len(short) == len(found):
        return f"only at step 0{ends} and at T (eval_every {e} is beyond T)"
    line = f"at step 0, every {e} steps{ends} and at T"
    if short:
        which = f"{len(short)} of {len(found)} attackers" if exact else "attackers"
        line += f" (only at step 0{ends} and T in the {which} whose T < {e})"
    return line


def per_trial(spec: SweepSpec, found: list[Plan], exact: bool) -> str:
    """The most one trial's budget can reach, and where f is scored."""
    t, examples = max(p.horizon for p in found), max(p.examples for p in found)
    batch = max(hp.batch_size for p in found for _, hp in p.stages)
    return f"at most T={t} steps, {amount(examples)} examples (batch <= {batch}); f scored {scored(spec, found, exact)}"


def sweep_line(spec: SweepSpec, total: Cost) -> str:
    """The whole sweep's steps and examples."""
    line = (f"whole sweep: at most {amount(total.steps)} steps, {amount(total.examples)} examples in "
            f"{total.trials} trials")
    if total.replays:
        line += f" (of them up to {amount(total.replays)} steps of refinement replays)"
    if total.benign_steps:
        line += f"; and at most {amount(total.benign_steps)} steps of benign fine-tunes (conditions.trainability)"
    if cap := spec.search.max_compute:
        line += f"; search.max_compute stops new trials once a defence has spent {amount(cap)} {spec.search.unit}"
    return line
