"""Notes on budgets that would surprise, made before a sweep starts (preflight.check prints them for
`validate` and `run`): a batch larger than the rows it draws from, an eval_every beyond T, a trial
or a sweep beyond a documented size. docs/troubleshooting.md ("Budget notes") explains each."""

from __future__ import annotations

from collections import Counter

from orchestrator.spec import cost as C
from orchestrator.spec.model import SpecError, SweepSpec
from trainables import data as D
from trainables.mixing import poison_counts

MAX_PAIRS = 3
"""Batch notes printed at most; the rest are counted in the last one."""


def notes(spec: SweepSpec, rows: dict[str, list[dict]]) -> list[str]:
    """The budget notes of `spec`; `rows` holds the splits read here (by name: attack, benign).
    Raise SpecError where a stage draws more rows than its split (or harm domain) holds."""
    found, exact = C.plans(spec)
    total = C.cost(spec, found, exact)
    return [*_batch_notes(spec, found, exact, rows), *_schedule_notes(spec, found, exact),
            *C.size_notes(spec, found, total)]


def _available(spec: SweepSpec, rows: dict[str, list[dict]], split: str, domain: str | None) -> tuple[int | None, str]:
    """Rows of a split (of one harm domain of the attack split) and how to name them; None where
    the split was not read here (a hub dataset)."""
    loaded = rows.get(split)
    if loaded is None:
        return None, ""
    if split == "attack" and domain is not None:
        n = sum(d == domain for d in D.domains(loaded, spec.data.attack))
        return n, f"the {n} row{'s' * (n != 1)} of domain {domain!r} in data.attack"
    return len(loaded), f"data.{split}'s {len(loaded)} row{'s' * (len(loaded) != 1)}"


def _batch_notes(spec: SweepSpec, found: list[C.Plan], exact: bool, rows: dict[str, list[dict]]) -> list[str]:
    """A batch larger than the rows drawn: BatchStream fills it from consecutive epoch shuffles,
    so rows repeat within a step, and the budget counts every row drawn into the batch."""
    pairs: Counter = Counter()  # in the order first met: stage 1 before stage 2
    for plan in found:
        seen: dict[tuple, None] = {}
        for j, (stage, hp) in enumerate(plan.stages):
            domain = plan.cfg.attacker.attack_domain if stage.data == "attack" else None
            have, named = _available(spec, rows, stage.data, domain)
            staged = bool(plan.cfg.attacker.stages)
            where = (f"space.stages (stage {j + 1}" + (f" {stage.name!r}" if stage.name else "")
                     + (", data: benign)" if stage.data == "benign" else ")")) if staged else "space"
            # a poison mix draws only its attack share from the attack split (the rest: data.benign)
            drawn = poison_counts(hp.dataset_size, hp.poison_ratio)[0] if stage.data == "attack" else hp.dataset_size
            if have is not None and drawn > have:
                mix = "" if drawn == hp.dataset_size else f" (poison_ratio {hp.poison_ratio}: {drawn} attack rows)"
                raise SpecError(f"spec error: {where}: dataset_size {hp.dataset_size}{mix} exceeds {named}; lower "
                                f"it to at most {have}" + (" attack rows" if mix else ""))
            if hp.batch_size > hp.dataset_size:
                seen[(where, hp.batch_size, hp.dataset_size, named)] = None
        pairs.update(list(seen))
    out = []
    for (where, batch, drawn, named), n in list(pairs.items())[:MAX_PAIRS]:
        field = "space.batch_size" if where == "space" else f"{where}: batch_size"
        size = f"space.dataset_size: {drawn}" if where == "space" else f"its dataset_size: {drawn}"
        which = "" if n == len(found) else f" in {n} of {len(found)} attackers" if exact else \
            " in attackers the search may pick"
        out.append(f"{field}: {batch} exceeds the {drawn} row{'s' * (drawn != 1)} drawn ({size}"
                   + (f", of {named}" if named else "") + f"){which}: each step trains on {_repeats(batch, drawn)}"
                   + _split(spec, batch) + f", and the budget counts {batch} examples per step (rows drawn, repeats "
                   f"included); lower batch_size to at most {drawn} for distinct rows in a step")
    if len(pairs) > MAX_PAIRS:
        out[-1] += f" ({len(pairs) - MAX_PAIRS} more such batch/rows pairs)"
    return out


def _repeats(batch: int, drawn: int) -> str:
    if batch % drawn:
        return f"each row {batch / drawn:.1f} times on average"
    k = batch // drawn
    times = "twice" if k == 2 else f"{k} times"
    return f"the one row {times}" if drawn == 1 else f"every row {times}"


def _split(spec: SweepSpec, batch: int) -> str:
    """How a distributed trial splits the batch: the repeats are in the global batch, across ranks."""
    ds = spec.distributed
    if ds is None or spec.resources.workers * ds.gradient_accumulation_steps == 1:
        return ""
    w, g = spec.resources.workers, ds.gradient_accumulation_steps
    return (f" (the global batch: {w} worker{'s' * (w != 1)} x {g} gradient-accumulation step{'s' * (g != 1)} "
            f"of {batch // (w * g)} rows each)")


def _schedule_notes(spec: SweepSpec, found: list[C.Plan], exact: bool) -> list[str]:
    """eval_every beyond T: the loop still scores f at step 0, at each stage's end and at T
    (AttackConfig.eval_steps), so a crossing is placed only to within the gap before it."""
    if spec.eval_schedule != "every":
        return []
    e = spec.eval_every
    groups: Counter = Counter()
    for plan in found:
        if plan.horizon < e:
            groups[(plan.set_by, plan.horizon, tuple(plan.eval_points() or ()), plan.gap)] += 1
    out = []
    for (set_by, t, points, gap), n in groups.items():
        what = {"max_steps": f"max_steps: {t}", "space.steps": f"space.steps: {t}",
                "space.stages": f"the {t} steps of space.stages"}[set_by]
        listed = ", ".join(map(str, points[:-1])) + f" and {points[-1]}"
        why = "step 0, each stage's end and T" if set_by == "space.stages" else "step 0 and T"
        which = "" if n == len(found) else f" in {n} of {len(found)} attackers" if exact else \
            " in attackers the search may pick"
        refine = f", then bisected {spec.refine} times (refine)" if spec.refine else ""
        out.append(f"eval_every: {e} is beyond {what}{which}: f is scored only at steps {listed} ({why}), so a "
                   f"crossing is placed only to within {gap} steps{refine}; lower eval_every below {gap} to score f "
                   "in between")
    return out
