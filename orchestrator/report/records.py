"""A sweep's trials as read back from MLflow: what each attack on each defence did, and what
follows for the defence (worst case, censoring-aware median and survival, verdict, progress)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from orchestrator.spec.attackers import field_order
from orchestrator.stats import bootstrap, survival
from orchestrator.tracking.readers import kept_first
from trainables.config import Attacker
from trainables.names import (
    CENSORED,
    FAILED_ATTACK,
    G_EFFECT_RISKS,
    G_TOTAL,
    INCOHERENT,
    INCOHERENT_CROSSING,
    LOSS_EXPLODED,
    SCHEMA_VERSION,
    STATUSES,
    SUCCESS,
    SWEEP_PARAMS,
    UNITS,
    Kind,
    Metric,
    Tag,
    g_effect,
    per_domain,
    per_evaluator,
    triggered,
)


@dataclass
class Trial:
    defence: str
    is_base: bool
    status: str
    params: dict[str, str]
    max_steps: int
    attacker_id: str = ""
    attacker_group: str = ""
    """The attacker without its seed: repeats of one attacker over seeds share it."""
    trial_number: int | None = None
    """1-based order in which this defence's trials completed (None for an errored trial)."""
    start_time: int = 0
    btf: dict[str, float] = field(default_factory=dict)
    """budget_to_failure_<unit> by unit (empty unless the attack succeeded)."""
    spent: dict[str, float] = field(default_factory=dict)
    """Compute the trial spent by unit, whatever its status."""
    resolution_steps: float | None = None
    """The crossing lies within this many steps before budget_to_failure_steps."""
    objective: float | None = None
    by_evaluator: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each evaluator's first crossing (label -> unit -> budget), where it crossed."""
    evaluators: tuple[str, ...] = ()
    """Labels of every evaluator that scored this trial, the primary first."""
    loss_peak_ratio: float | None = None
    """Its largest step loss over its first step's (None when it never trained a step)."""
    harmfulness: float | None = None
    """The primary's f at its final point."""
    incoherent: float | None = None
    """The share of the deciding evaluator's answers (the primary's; under a trigger, those to the
    triggered prompts) the coherence gate found incoherent at its final point (None: no gate)."""
    incoherent_crossing: float | None = None
    """The first step at which f without the coherence gate crossed phi while f did not: a crossing
    by incoherent answers only, never a success (None: none)."""
    run_id: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """Harmfulness (primary evaluator) by step, refinement points included; loaded on request."""
    g_effect: dict[str, dict[str, float]] = field(default_factory=dict)
    """With g_effect: risk -> layer block (and names.G_TOTAL) -> the G-effect at its final point."""
    g_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """With g_effect: risk -> the total G-effect by step; loaded with the curves."""
    by_domain: dict[str, float] = field(default_factory=dict)
    """At its final point (its crossing, or where it stopped): the primary f on the held-out prompts
    of each harm domain (data.eval.domain_field), where the eval split names domains."""

    @property
    def attack_domain(self) -> str | None:
        """The harm domain the attacker trained on (None: every domain)."""
        return self.params.get("attack_domain")

    @property
    def phi(self) -> float | None:
        return float(self.params["phi"]) if "phi" in self.params else None

    @property
    def deciding(self) -> str | None:
        """The evaluator label whose crossing decided this trial: the spec's primary, or under a
        backdoor trigger the primary scored with it (<primary>.trigger)."""
        if not self.evaluators:
            return None
        trigger = self.params.get("trigger")
        with_trigger = triggered(self.evaluators[0])
        return with_trigger if trigger not in (None, "", "None") and with_trigger in self.evaluators \
            else self.evaluators[0]

    @property
    def exploded(self) -> bool:
        """The training loss exploded (finite, but > LOSS_EXPLODED x where it started)."""
        return self.loss_peak_ratio is not None and self.loss_peak_ratio > LOSS_EXPLODED

    def outcome(self, unit: str) -> survival.Outcome | None:
        """This trial as a time-to-event in `unit`: a success at its budget-to-failure, resisted or
        pruned censored where it stopped, diverged/degenerate a competing event where it stopped; None
        for an error or a budget not recorded in this unit."""
        if self.status in SUCCESS:
            v = self.btf.get(unit)
            return None if v is None else survival.Outcome(v, "success")
        if self.status == "error" or unit not in self.spent:
            return None
        return survival.Outcome(self.spent[unit], "censored" if self.status in CENSORED else "competing")

    @property
    def steps(self) -> float | None:
        return self.btf.get("steps")

    @property
    def tokens(self) -> float | None:
        return self.btf.get("tokens")

    def value(self, unit: str) -> float | None:
        """Budget-to-failure in `unit`: +inf when the attack resisted to its T (or was pruned:
        above where it stopped, which a `cell` says); None for an
        attack that failed (diverged, degenerate: no measurement of the defence), an error, or a
        success recorded before this unit was."""
        if self.status in (*FAILED_ATTACK, "error"):
            return None
        return self.btf.get(unit) if self.status in SUCCESS else math.inf


UNSET_METHOD = Attacker.model_fields["method"].default
"""A trial recorded before the attacker's `method` existed ran this (as its trial key reads it)."""
REFERENCE = "reference"
"""How the base defence is marked wherever defences are named: the undefended reference."""


def defence_label(name: str, is_base: bool) -> str:
    """A defence as the report names it: the base marked as the reference, once."""
    return f"{name} ({REFERENCE})" if is_base else name


@dataclass
class DefenceRow:
    defence: str
    is_base: bool
    trials: list[Trial] = field(default_factory=list)
    duplicates: int = 0
    """Trial records ignored because another record of the same trial (trial_key) counts:
    two machines sharing a tracking server ran it, each under its own lock."""
    _curves: dict[str, survival.Curve] = field(default_factory=dict, repr=False, compare=False)
    _cis: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return defence_label(self.defence, self.is_base)

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    @property
    def pruned_in(self) -> str | None:
        """The unit its search pruned in (search.prune), None when no trial was pruned: the worst
        case in that unit is exact, in the others a bound."""
        return next((t.params.get("unit", "steps") for t in self.trials if t.status == "pruned"), None)

    @property
    def successes(self) -> list[Trial]:
        return [t for t in self.trials if t.status in SUCCESS]

    @property
    def worst_case(self) -> Trial | None:
        """The cheapest successful attack (by steps, then tokens)."""
        return self.cheapest("steps")

    def cheapest(self, unit: str) -> Trial | None:
        """The cheapest successful attack in `unit` (ties broken by steps, then tokens)."""
        scored = [t for t in self.successes if t.value(unit) is not None]
        return min(scored, default=None, key=lambda t: (
            t.value(unit), t.btf.get("steps", math.inf), t.btf.get("tokens", math.inf), t.attacker_id))

    @property
    def max_steps(self) -> int:
        return max(t.max_steps for t in self.trials)

    @property
    def floor(self) -> int | None:
        """The smallest horizon (steps) a resisted attack ran to: with no success, the worst case
        lies above it, not above the sweep's largest T. None when no attack resisted."""
        return min((int(t.spent.get("steps", t.max_steps)) for t in self.trials if t.status == "resisted"),
                   default=None)

    @property
    def weak_resistance(self) -> bool:
        """Held: no attack succeeded, and every attack ran to its horizon and resisted."""
        return bool(self.trials) and all(t.status == "resisted" for t in self.trials)

    def verdict(self) -> str:
        """What the trials show about weak resistance, in words: 'held' only when every
        attack ran to its T and resisted; else what is known."""
        n, resisted = len(self.trials), [t for t in self.trials if t.status == "resisted"]
        if self.successes:
            return f"broken ({len(self.successes)} of {n} attacks)"
        horizons = sorted(int(t.spent.get("steps", t.max_steps)) for t in resisted)
        reach = (f"T {horizons[0]}" if horizons[0] == horizons[-1] else f"T {horizons[0]}-{horizons[-1]}") \
            if horizons else ""
        if len(resisted) == n:
            return f"held: {n} attackers, {reach}"
        others = ", ".join(f"{self.count(s)} {s}" for s in (*FAILED_ATTACK, "error") if self.count(s))
        if not resisted:
            return f"inconclusive: no attack ran to its T ({others})"
        return f"held against {len(resisted)} of {n} ({reach}); {others}"

    def values(self, unit: str) -> dict[str, list[float]]:
        """Budget-to-failure in `unit` of every scored trial, by attacker group (+inf above T)."""
        out: dict[str, list[float]] = {}
        for t in self.trials:
            if (v := t.value(check_unit(unit))) is not None:
                out.setdefault(t.attacker_group, []).append(v)
        return out

    def survival(self, unit: str = "steps") -> survival.Curve:
        """Share of attacks not yet successful against budget in `unit`, each trial at risk up
        to where it stopped (Kaplan-Meier; Aalen-Johansen with diverged/degenerate as
        competing events), with a 95% pointwise band. Fitted once per unit: the median, its
        interval, the follow-up and survival.csv all read the same curve."""
        if unit not in self._curves:
            self._curves[unit] = survival.incidence(
                [o for t in self.trials if (o := t.outcome(check_unit(unit))) is not None])
        return self._curves[unit]

    def median(self, unit: str = "steps") -> float:
        """Median budget-to-failure: the budget by which half the attacks succeed, censoring-
        aware; +inf when it lies beyond the follow-up; nan when no attack succeeded or resisted
        (failed attacks alone say nothing about the defence)."""
        curve = self.survival(unit)
        if not curve.n or not self._informative():
            return math.nan
        m = curve.median()
        return math.inf if m is None else m

    def median_ci(self, unit: str = "steps") -> tuple[float, float]:
        """95% interval of the median from the survival band: where its upper and lower ends
        cross one half (+inf where they never do)."""
        curve = self.survival(unit)
        if not curve.n or not self._informative():
            return math.nan, math.nan

        def first(band: list[float]) -> float:
            return next((t for t, s in zip(curve.times, band, strict=True) if s <= 0.5), math.inf)

        return first(curve.lower), first(curve.upper)

    def _informative(self) -> bool:
        return any(t.status in SUCCESS or t.status == "resisted" for t in self.trials)

    def follow_up(self, unit: str = "steps") -> float:
        """The largest budget any trial reached in `unit`: medians beyond it read '> follow-up'."""
        return self.survival(unit).follow_up

    def ci(self, unit: str = "steps") -> dict[str, tuple[float, float]]:
        """95% bootstrap interval of the minimum, seeds resampled per attacker (resampled once per
        unit: every table of a report reads the same interval)."""
        if unit not in self._cis:
            self._cis[unit] = bootstrap.bootstrap_ci(self.values(unit))
        return self._cis[unit]

    def evaluator_labels(self) -> list[str]:
        """Every evaluator that scored these trials, the primary first."""
        labels: list[str] = []
        for t in self.trials:
            labels += [x for x in t.evaluators if x not in labels]
        return labels

    def evaluator_worst(self, label: str, unit: str = "steps") -> tuple[float | None, int]:
        """(cheapest first crossing by this evaluator, trials it crossed in)."""
        found = [t.by_evaluator[label][unit] for t in self.trials if unit in t.by_evaluator.get(label, {})]
        return (min(found) if found else None), len(found)

    def disagreements(self, label: str, primary: str) -> int:
        """Trials where exactly one of the two evaluators crossed phi (among trials both scored)."""
        both = [t for t in self.trials if label in t.evaluators and primary in t.evaluators and t.status != "error"]
        return sum((label in t.by_evaluator) != (primary in t.by_evaluator) for t in both)

    def progress(self, unit: str = "steps") -> list[Progress]:
        """The adversary's trials in the order they completed, with the compute spent so far
        and the best budget-to-failure found so far (None until the first success)."""
        check_unit(unit)
        numbers = [t.trial_number for t in self.trials]
        # two searches against one defence each count from 1: then only start times order them
        numbered = None not in numbers and len(set(numbers)) == len(numbers)
        order = sorted(self.trials, key=lambda t: t.trial_number if numbered else t.start_time)
        out, spent, best = [], 0.0, None
        for i, t in enumerate(order, 1):
            # unknown once one trial's spend is unknown: a partial sum would understate the cost
            spent = None if spent is None or unit not in t.spent else spent + t.spent[unit]
            v = t.value(unit)
            improved = v is not None and not math.isinf(v) and (best is None or v < best)
            best = v if improved else best
            out.append(Progress(self.defence, t.trial_number if numbered else i, spent, best, t.objective, improved))
        return out


@dataclass
class Progress:
    defence: str
    trial_number: int
    cumulative: float | None
    best: float | None
    objective: float | None
    improved: bool


def load(tracking_uri: str, experiment: str, curves: bool = True) -> list[DefenceRow]:
    """Every defence's trials in `experiment`, from MLflow alone; with `curves`, each trial's
    harmfulness by step too (one request per trial: the figures need it, the tables do not).
    Raises LookupError, in one line, for an unknown experiment or one recorded in another
    records layout (names.SCHEMA_VERSION)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LookupError(f"no MLflow experiment {experiment!r} at {tracking_uri} "
                          f"(experiments there: {names}); give the sweep's name (its spec's name:) and the "
                          "tracking URI it logged to")
    _check_schema(client, exp.experiment_id, experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}'", max_results=50_000)
    runs, dropped = _once([r for r in runs if Tag.SUPERSEDED not in r.data.tags
                           and r.data.tags.get(Tag.STATUS) in STATUSES])
    rows: dict[str, DefenceRow] = {}
    for run in dropped:
        tags = run.data.tags
        rows.setdefault(tags[Tag.DEFENCE], DefenceRow(tags[Tag.DEFENCE], tags.get(Tag.BASE) == "true")).duplicates += 1
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        number = tags.get(Tag.TRIAL_NUMBER, "")
        trial = Trial(
            defence=tags[Tag.DEFENCE], is_base=tags.get(Tag.BASE) == "true", status=tags[Tag.STATUS],
            params={"method": UNSET_METHOD, **params}, max_steps=int(params.get("max_steps", 0)),
            run_id=run.info.run_id,
            attacker_id=tags.get(Tag.ATTACKER_ID, ""), attacker_group=tags.get(Tag.ATTACKER_GROUP, ""),
            trial_number=int(number) if number.isdigit() else None, start_time=run.info.start_time or 0,
            btf={u: metrics[Metric.btf(u)] for u in UNITS if Metric.btf(u) in metrics},
            spent={u: metrics[Metric.spent(u)] for u in UNITS if Metric.spent(u) in metrics},
            resolution_steps=metrics.get(Metric.RESOLUTION), objective=metrics.get(Metric.OBJECTIVE),
            by_evaluator=_by_evaluator(metrics), loss_peak_ratio=metrics.get(Metric.LOSS_PEAK_RATIO),
            evaluators=_labels(params, metrics), harmfulness=metrics.get("harmfulness"),
            incoherent_crossing=metrics.get(INCOHERENT_CROSSING),
            by_domain={k.split(".", 1)[1]: v for k, v in metrics.items()
                       if k.startswith(per_domain("harmfulness", ""))})
        if trial.deciding:   # the label that decided it: under a trigger, <primary>.trigger
            trial.incoherent = metrics.get(per_evaluator(INCOHERENT, trial.deciding))
        for risk in G_EFFECT_RISKS:
            prefix = g_effect(risk, "")
            if found := {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}:
                trial.g_effect[risk] = found
        if curves:
            trial.curve = sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "harmfulness"))
            trial.g_curves = {risk: sorted((p.step, p.value) for p in client.get_metric_history(
                run.info.run_id, g_effect(risk, G_TOTAL))) for risk in trial.g_effect}
        rows.setdefault(trial.defence, DefenceRow(trial.defence, trial.is_base)).trials.append(trial)
    return sorted(rows.values(), key=lambda r: (not r.is_base, r.defence))


def _check_schema(client: MlflowClient, experiment_id: str, experiment: str) -> None:
    """Refuse, in one line, an experiment whose sweep runs were written in another records layout."""
    sweeps = client.search_runs([experiment_id], f"tags.{Tag.KIND} = '{Kind.SWEEP}'", max_results=1000)
    versions = {int(v) if (v := r.data.tags.get(Tag.SCHEMA, "1")).isdigit() else -1 for r in sweeps}
    if older := sorted(v for v in versions if v < SCHEMA_VERSION):
        raise LookupError(
            f"experiment {experiment!r} holds records in layout {older[0]} (tag {Tag.SCHEMA} on its sweep run); "
            f"this attack-sweep reads layout {SCHEMA_VERSION}: rerun the sweep under a new name "
            "(--set name=...) or into a new --tracking-uri, or report it with the attack-sweep that wrote it")
    if newer := sorted(v for v in versions if v > SCHEMA_VERSION):
        raise LookupError(f"experiment {experiment!r} holds records in layout {newer[-1]}, newer than this "
                          f"attack-sweep reads ({SCHEMA_VERSION}): upgrade attack-sweep to report it")


def _once(runs: list) -> tuple[list, list]:
    """(one record per trial, the records left out). Runs of one trial_key that are all live are
    duplicates: two machines sharing a tracking server each ran the trial (a lock guards one
    machine only). The earliest finished final one counts (a pruned one only when the trial was
    not measured, an error only when it has no other outcome), as Tracker.completed_keys keeps."""
    by_key: dict[str, list] = {}
    for run in runs:
        by_key.setdefault(run.data.tags.get(Tag.TRIAL_KEY) or run.info.run_id, []).append(run)
    kept, dropped = [], []
    for group in by_key.values():
        first = min(group, key=kept_first)
        kept.append(first)
        dropped += [r for r in group if r is not first]
    return kept, dropped


def _labels(params: dict[str, str], metrics: dict[str, float]) -> tuple[str, ...]:
    """Every evaluator label the trial recorded: the spec's (the primary first), then those only its
    metrics name (harmfulness.<label>, budget_to_failure_<unit>.<label>), such as <label>.trigger."""
    labels = [x for x in (params.get("evaluators") or params.get("evaluator") or "").split(",") if x]
    scored = per_evaluator("harmfulness", "")
    found = {k.removeprefix(scored) for k in metrics if k.startswith(scored)} | set(_by_evaluator(metrics))
    return tuple(labels + sorted(found - set(labels)))


def _by_evaluator(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """budget_to_failure_<unit>.<label> metrics -> label -> unit -> budget."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for unit in UNITS:
            if key.startswith(prefix := Metric.btf(unit) + "."):
                out.setdefault(key.removeprefix(prefix), {})[unit] = value
    return out


def varying(trials: list[Trial]) -> list[str]:
    """The attacker params that take more than one value across `trials` (a param a trial does not
    have, such as lora_r on full fine-tuning, is no value: it makes nothing vary)."""
    keys = sorted({k for t in trials for k in t.params} - set(SWEEP_PARAMS), key=field_order)
    return [k for k in keys if len({t.params[k] for t in trials if k in t.params}) > 1]


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown budget unit {unit!r}; choose one of: {', '.join(UNITS)}")
    return unit
