"""A sweep's device time, before it runs: its steps (orchestrator/spec/cost.py) at the step times
recorded for the same sweep in the tracking store, read only where the store exists."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from orchestrator.echo import amount
from orchestrator.spec import cost as C
from orchestrator.spec.model import SweepSpec
from orchestrator.spec.store import is_mlflow

MAX_DEVICE_HOURS = 24.0
"""A whole sweep whose recorded step time puts it beyond a device-day gets a note, with the hours."""


@dataclass(frozen=True)
class Rate:
    """A defence's step time, the median over its finished trials in the tracking store."""

    train: float
    """Device-seconds of training per step (accelerator_seconds / steps)."""
    evaluate: float
    """Seconds of evaluation per training step (eval_seconds_total / steps)."""
    trials: int


def recorded(tracking_uri: str, experiment: str) -> tuple[dict[str, Rate], str]:
    """Each defence's Rate from the finished trials of `experiment`, or ({}, why there are none).
    A sqlite store is read only where its file exists and holds MLflow's tables: nothing is created."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
        if not path.is_file():
            return {}, f"no store at {tracking_uri}; validate reads one, never creates one"
        if not is_mlflow(path):
            return {}, f"{tracking_uri} is not an MLflow store"
        store = f"sqlite:///{path.resolve()}"  # MLflow keeps a store per URI: a relative one per process
    elif tracking_uri.startswith(("http://", "https://")):
        store = tracking_uri
        from urllib.parse import urlparse

        from orchestrator.spec.checkpoints import unreachable

        parsed = urlparse(tracking_uri)
        if why := unreachable(parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80), 5.0):
            return {}, f"no MLflow server answers at {tracking_uri} ({why})"
    else:
        return {}, f"{tracking_uri} is not read here (a sqlite:/// store or a server is)"
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.store import MLFLOW_HTTP_DEFAULTS
    from trainables.names import TERMINAL, Kind, Metric, Tag

    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        client = MlflowClient(store)
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}'", max_results=50_000)
    except Exception as err:  # noqa: BLE001 - an estimate's source, never a reason to fail validate
        return {}, f"{tracking_uri} could not be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    per: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        tags, m = run.data.tags, run.data.metrics
        steps = m.get(Metric.spent("steps"), 0.0)
        if Tag.SUPERSEDED in tags or tags.get(Tag.STATUS) not in TERMINAL or steps <= 0 \
                or Metric.spent("accelerator_seconds") not in m:
            continue
        per.setdefault(tags.get(Tag.DEFENCE, "?"), []).append(
            (m[Metric.spent("accelerator_seconds")] / steps, m.get(Metric.EVAL_SECONDS_TOTAL, 0.0) / steps))
    rates = {d: Rate(statistics.median(t for t, _ in xs), statistics.median(e for _, e in xs), len(xs))
             for d, xs in per.items()}
    return rates, "" if rates else f"no finished trials of {experiment!r} in {tracking_uri}"


@dataclass(frozen=True)
class Time:
    device_s: float
    """Training device-seconds of the whole sweep."""
    wall_s: float | None
    """Wall time of training (over the devices a trial trains on) and evaluation, at `at_once` trials at
    a time (None: unknown here); loading models and starting processes is not in the records."""
    at_once: int | None
    rates: dict[str, Rate]
    guessed: list[str]
    """Defences without records of their own, taken at the others' median."""


def device_time(spec: SweepSpec, total: C.Cost, rates: dict[str, Rate]) -> Time | None:
    """The sweep's device time at its recorded step times (None without records)."""
    if not rates:
        return None
    names = [d.name for d in spec.defences]
    others = Rate(statistics.median(r.train for r in rates.values()),
                  statistics.median(r.evaluate for r in rates.values()), 0)
    guessed = [n for n in names if n not in rates]
    per = total.trained / len(names)  # every defence trains the same attackers
    device = sum(per * rates.get(n, others).train for n in names)
    evaluating = sum(per * rates.get(n, others).evaluate for n in names)
    at_once = _at_once(spec, total.trials)
    world = spec.resources.workers if spec.distributed else 1
    wall = None if at_once is None else (device / world + evaluating) / at_once
    return Time(device, wall, at_once, {n: rates.get(n, others) for n in names}, guessed)


def _at_once(spec: SweepSpec, trials: int) -> int | None:
    """Trials in flight together: search.max_concurrent, else what this machine's CPUs fit for a
    CPU-only local run (as Ray would start them), else unknown."""
    r = spec.resources
    if spec.search.max_concurrent:
        n = spec.search.max_concurrent
    elif r.gpu == 0:
        n = int((os.cpu_count() or 1) // (r.cpu * r.workers))
    else:
        return None
    return max(1, min(n, trials))


def duration(seconds: float) -> str:
    """seconds in the unit a person plans in: 90 s, 25 min, 7.5 h, 12 days, 19 years."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 2 * 365.25 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365.25 * 86400):.0f} years"


def time_line(spec: SweepSpec, t: Time | None, why: str) -> str:
    """The validate line on device time."""
    if t is None:
        return f"time: not estimated ({why})"
    per = sorted({f"{r.train:.2g}" for r in t.rates.values()}, key=float)
    at = f"{per[0]} s/step" if len(per) == 1 else \
        "median s/step per defence " + ", ".join(f"{n} {r.train:.2g}" for n, r in t.rates.items())
    n = sum(r.trials for r in t.rates.values())  # a guessed defence's Rate counts none
    line = (f"time: about {duration(t.device_s)} of training device time at the {at} recorded for this sweep "
            f"({n} finished trial{'s' * (n != 1)}")
    line += f"; {', '.join(t.guessed)}: none, taken at the others' median)" if t.guessed else ")"
    if t.wall_s is not None:
        line += (f"; with evaluation (trial start-up aside), {t.at_once} trial{'s' * (t.at_once != 1)} at a time: "
                 f"about {duration(t.wall_s)}")
    return line


def hours_note(t: Time | None, total: C.Cost) -> list[str]:
    """A note when the recorded step time puts the sweep beyond MAX_DEVICE_HOURS."""
    if t is None or t.device_s / 3600 <= MAX_DEVICE_HOURS:
        return []
    return [f"whole sweep: about {t.device_s / 3600:,.0f} device-hours of training at the step time recorded for "
            f"this sweep ({amount(total.trained)} steps; beyond {MAX_DEVICE_HOURS:g}); lower "
            "max_steps or run fewer attackers"]


@dataclass(frozen=True)
class Estimate:
    """What validate prints of the sweep's cost."""

    total: C.Cost
    per_trial: str
    """What one trial can reach (validate's `per trial:` line, less phi and refine)."""
    lines: list[str]
    """The whole sweep: steps and examples, then time."""
    notes: list[str]
    """A sweep beyond a documented size (MAX_DEVICE_HOURS)."""


def estimate(spec: SweepSpec, tracking_uri: str) -> Estimate:
    """The sweep's cost as validate prints it, its time read from `tracking_uri` where it holds
    finished trials of this sweep."""
    found, exact = C.plans(spec)
    total = C.cost(spec, found, exact)
    rates, why = recorded(tracking_uri, spec.name)
    t = device_time(spec, total, rates)
    return Estimate(total, C.per_trial(spec, found, exact), [C.sweep_line(spec, total), time_line(spec, t, why)],
                    hours_note(t, total))
