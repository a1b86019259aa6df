"""The conditions' records read back from MLflow: the settings they are judged by (the sweep
run's `conditions` tag), each defence's release measurement and its benign fine-tune."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from trainables.conditioning import rir
from trainables.names import CONDITION_STATUSES, MEASURED, UNITS, Kind, Metric, Tag


@dataclass
class Release:
    """A defence measured at release: utility proxy and lm-eval metrics (release.py names)."""

    defence: str
    metrics: dict[str, float]


@dataclass
class Benign:
    """A defence's benign fine-tune: reached / not_reached / known_at_release / diverged / degenerate."""

    defence: str
    status: str
    btt: dict[str, float] = field(default_factory=dict)
    """Budget to the target by unit (only when reached)."""
    spent: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    """The task's score by step."""
    phi: float = math.nan
    """The score the target asks for."""


@dataclass
class Diagnostic:
    """A defence's conditioning at release: per task (harmful, benign) the Metric.CONDITIONING
    figures and the verdict (ok, or why there is no κ)."""

    defence: str
    figures: dict[str, dict[str, float]]
    """task -> quantity -> value."""
    verdict: dict[str, str]
    why: dict[str, str]
    params: dict[str, str]
    """head, parameters, size, ...: what was measured."""
    is_base: bool = False

    def kappa(self) -> dict[str, float]:
        """κ per task where it is measured (verdict ok)."""
        return {t: f["kappa"] for t, f in self.figures.items() if self.verdict.get(t) == "ok" and "kappa" in f}


@dataclass
class Paper:
    """A defence attacked by its paper's attacker (Kind.PAPER): its status, budget-to-failure by unit
    where it broke the defence, and what it spent."""

    defence: str
    status: str
    btf: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    attacker: dict[str, str] = field(default_factory=dict)


@dataclass
class Built:
    """A defence the sweep built (Kind.BUILD): method, budget by unit and figures at release."""

    defence: str
    method: str
    finetune: str
    spent: dict[str, float]
    release: dict[str, float]
    """harmfulness_at_release, incoherent_at_release, utility (names.RELEASE_*) where measured."""
    seconds: float = math.nan


@dataclass
class Records:
    settings: dict
    """{"conditions": the spec's block, "unit": ..., "immunised_on": {defence: [domain, ...]}}."""
    release: dict[str, Release] = field(default_factory=dict)
    benign: dict[str, Benign] = field(default_factory=dict)
    diagnostic: dict[str, Diagnostic] = field(default_factory=dict)
    paper: dict[str, Paper] = field(default_factory=dict)
    built: dict[str, Built] = field(default_factory=dict)

    @property
    def asked(self) -> dict:
        return self.settings.get("conditions") or {}

    def immunised_on(self, defence: str) -> list[str] | None:
        return (self.settings.get("immunised_on") or {}).get(defence)


def load(tracking_uri: str, experiment: str, curves: bool = True) -> Records:
    """The latest sweep run's settings and each defence's latest finished condition and diagnostic
    runs (empty Records when the sweep asked for neither)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return Records({})
    sweeps = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.SWEEP}'",
                                order_by=["attributes.start_time DESC"], max_results=1000)
    tagged = [r for r in sweeps if Tag.CONDITIONS in r.data.tags]
    out = Records(json.loads(tagged[0].data.tags[Tag.CONDITIONS]) if tagged else {})
    out.diagnostic = diagnostics(client, exp.experiment_id)
    out.paper, out.built = papers(client, exp.experiment_id), builds(client, exp.experiment_id)
    if not tagged:
        return out
    for kind in (Kind.RELEASE, Kind.BENIGN):
        runs = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{kind}'",
                                  order_by=["attributes.start_time DESC"], max_results=50_000)
        for run in runs:  # the latest finished run of each defence counts
            tags, metrics = run.data.tags, run.data.metrics
            defence = tags.get(Tag.DEFENCE, "")
            if Tag.SUPERSEDED in tags or tags.get(Tag.STATUS) not in CONDITION_STATUSES:
                continue
            if kind == Kind.RELEASE and defence not in out.release:
                out.release[defence] = Release(defence, dict(metrics))
            elif kind == Kind.BENIGN and defence not in out.benign:
                b = Benign(defence, tags[Tag.STATUS],
                           btt={u: metrics[Metric.btt(u)] for u in UNITS if Metric.btt(u) in metrics},
                           spent={u: metrics[Metric.spent(u)] for u in UNITS if Metric.spent(u) in metrics},
                           phi=float(run.data.params.get("phi", "nan")))
                if curves:
                    b.curve = sorted((p.step, p.value)
                                     for p in client.get_metric_history(run.info.run_id, Metric.TASK_SCORE))
                out.benign[defence] = b
    return out


def _latest(client: MlflowClient, experiment_id: str, kind: str, statuses: tuple[str, ...]) -> dict[str, object]:
    """Each defence's latest run of `kind` that ended with one of `statuses`, not superseded."""
    out: dict[str, object] = {}
    for run in client.search_runs([experiment_id], f"tags.{Tag.KIND} = '{kind}'",
                                  order_by=["attributes.start_time DESC"], max_results=50_000):
        tags, defence = run.data.tags, run.data.tags.get(Tag.DEFENCE, "")
        if Tag.SUPERSEDED not in tags and tags.get(Tag.STATUS) in statuses and defence not in out:
            out[defence] = run
    return out


def papers(client: MlflowClient, experiment_id: str) -> dict[str, Paper]:
    """Each defence's latest finished attack by its paper's attacker."""
    from trainables.names import TERMINAL

    return {d: Paper(d, run.data.tags[Tag.STATUS],
                     btf={u: run.data.metrics[Metric.btf(u)] for u in UNITS if Metric.btf(u) in run.data.metrics},
                     spent={u: run.data.metrics[Metric.spent(u)] for u in UNITS if Metric.spent(u) in run.data.metrics},
                     attacker=dict(run.data.params))
            for d, run in _latest(client, experiment_id, Kind.PAPER, TERMINAL).items()}


def builds(client: MlflowClient, experiment_id: str) -> dict[str, Built]:
    """Each built defence's latest build record."""
    from trainables.names import BUILT, RELEASE_HARMFULNESS, RELEASE_INCOHERENT, RELEASE_UTILITY

    out = {}
    for d, run in _latest(client, experiment_id, Kind.BUILD, (BUILT,)).items():
        m = run.data.metrics
        out[d] = Built(d, run.data.params.get("method", "?"), run.data.params.get("finetune", "?"),
                       {u: m[Metric.spent(u)] for u in UNITS if Metric.spent(u) in m},
                       {k: m[k] for k in (RELEASE_HARMFULNESS, RELEASE_INCOHERENT, RELEASE_UTILITY) if k in m},
                       m.get(Metric.BUILD_SECONDS, math.nan))
    return out


def diagnostics(client: MlflowClient, experiment_id: str) -> dict[str, Diagnostic]:
    """Each defence's latest finished diagnostic run."""
    out: dict[str, Diagnostic] = {}
    runs = client.search_runs([experiment_id], f"tags.{Tag.KIND} = '{Kind.DIAGNOSTIC}'",
                              order_by=["attributes.start_time DESC"], max_results=50_000)
    for run in runs:
        tags, defence = run.data.tags, run.data.tags.get(Tag.DEFENCE, "")
        if Tag.SUPERSEDED in tags or tags.get(Tag.STATUS) != MEASURED or defence in out:
            continue
        figures: dict[str, dict[str, float]] = {}
        for name, value in run.data.metrics.items():
            quantity, _, task = name.partition(".")
            if quantity in Metric.CONDITIONING and task:
                figures.setdefault(task, {})[quantity] = value
        out[defence] = Diagnostic(defence, figures, _by_task(tags, Tag.VERDICT), _by_task(tags, Tag.WHY),
                                  dict(run.data.params), tags.get(Tag.BASE) == "true")
    return out


def rirs(diagnostics: dict[str, Diagnostic]) -> dict[str, float]:
    """Each diagnosed defence's RIR against the base's diagnostic (trainables.conditioning.rir: nan
    where a κ is missing; the base's own is 1); empty without a diagnostic of the base."""
    base = next((d for d in diagnostics.values() if d.is_base), None)
    if base is None:
        return {}
    return {name: rir(d.kappa(), base.kappa()) for name, d in diagnostics.items()}


def _by_task(tags: dict[str, str], name: str) -> dict[str, str]:
    """Tags <name>.<task> as {task: value}."""
    return {k.removeprefix(f"{name}."): v for k, v in tags.items() if k.startswith(f"{name}.")}
