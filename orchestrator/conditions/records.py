"""The conditions' records read back from MLflow: the settings they are judged by (the sweep
run's `conditions` tag), each defence's release measurement and its benign fine-tune."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from trainables.names import CONDITION_STATUSES, UNITS, Kind, Metric, Tag


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
class Records:
    settings: dict
    """{"conditions": the spec's block, "unit": ..., "immunised_on": {defence: [domain, ...]}}."""
    release: dict[str, Release] = field(default_factory=dict)
    benign: dict[str, Benign] = field(default_factory=dict)

    @property
    def asked(self) -> dict:
        return self.settings.get("conditions") or {}

    def immunised_on(self, defence: str) -> list[str] | None:
        return (self.settings.get("immunised_on") or {}).get(defence)


def load(tracking_uri: str, experiment: str, curves: bool = True) -> Records:
    """The latest sweep run's settings and each defence's latest finished condition runs (empty
    Records when the sweep asked for no condition)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return Records({})
    sweeps = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.SWEEP}'",
                                order_by=["attributes.start_time DESC"], max_results=1000)
    tagged = [r for r in sweeps if Tag.CONDITIONS in r.data.tags]
    if not tagged:
        return Records({})
    out = Records(json.loads(tagged[0].data.tags[Tag.CONDITIONS]))
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
