"""The MLflow writer of a sweep: an experiment per sweep name, a parent run per sweep, a child run
per trial, an adversary run per defence and search (the layout: docs/design-notes.md,
"orchestrator/tracking.py"). Every name it writes is spelled once, in trainables/names.py."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from mlflow import entities
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from orchestrator.echo import say
from orchestrator.tracking.readers import kept_first, trials_view
from orchestrator.tracking.store import MLFLOW_HTTP_DEFAULTS, PATIENCE_S, Patient, seed_sqlite
from trainables.names import (
    BUDGET_UNITS,
    CONDITION_STATUSES,
    CROSSING,
    CURVE,
    EXPERIMENT_KIND,
    G_EFFECT_SECONDS,
    PROMPTS_SCORED,
    PROVENANCE,
    SCHEMA_VERSION,
    STEP0_CACHED,
    SUCCESS,
    TERMINAL,
    TRAIN_REWARD,
    TRIALS_VIEW,
    ExperimentTag,
    Kind,
    Metric,
    Tag,
)

FLUSH_S = float(os.environ.get("ATTACK_SWEEP_FLUSH_S", "2"))
"""How long a trial's evaluations may wait in the driver before they are sent to MLflow together:
one log_batch per trial every FLUSH_S, not one per evaluation (on sqlite each costs the driver
~15 ms, which two concurrent trials on 2 cores pay out of their own CPU time). Sent at once when
the trial ends, is rerun or the sweep closes. ATTACK_SWEEP_FLUSH_S sets it (0: every evaluation
at once)."""


def is_curve(key: str) -> bool:
    """A result key recorded by step: an EvalPoint curve, or a per-evaluator one (metric.label)."""
    return key in (*CURVE, Metric.TASK_SCORE, PROMPTS_SCORED, STEP0_CACHED, G_EFFECT_SECONDS, TRAIN_REWARD) or (
        "." in key and not key.startswith(CROSSING + "."))



class Tracker:
    """The MLflow side of one sweep."""

    def __init__(self, tracking_uri: str, sweep: str, spec_digest: str,
                 sweep_params: dict[str, Any], echo: Callable[[str], None] = say,
                 patience_s: float = PATIENCE_S):
        if tracking_uri.startswith(("http://", "https://")):
            for name, value in MLFLOW_HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        seed_sqlite(tracking_uri)
        self.client = Patient(MlflowClient(tracking_uri), tracking_uri, echo, patience_s)
        self.sweep = sweep
        exp = self.client.get_experiment_by_name(sweep)
        if exp is not None:
            self.experiment_id = exp.experiment_id
        else:
            try:
                self.experiment_id = self.client.create_experiment(sweep)
            except RestException:  # created meanwhile (another machine, or a retried request)
                if (exp := self.client.get_experiment_by_name(sweep)) is None:
                    raise
                self.experiment_id = exp.experiment_id
        if exp is None or exp.tags.get(ExperimentTag.KIND) != EXPERIMENT_KIND:
            # 'Machine learning', not a GenAI app: spares the UI's "what kind of experiment?" prompt
            self.client.set_experiment_tag(self.experiment_id, ExperimentTag.KIND, EXPERIMENT_KIND)
        self.parent_id = self._parent(spec_digest, sweep_params)
        self._pending: dict[str, tuple[float, list]] = {}
        """run id -> (when its first buffered point came, its buffered metrics): log_point(buffered=True)."""
        self.pruned_runs: dict[str, str] = {}
        """trial_key -> its pruned run, for the trials this run measures again (completed_keys)."""

    def _parent(self, spec_digest: str, params: dict[str, Any]) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.{Tag.KIND} = '{Kind.SWEEP}' and tags.{Tag.SPEC_DIGEST} = '{spec_digest}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=f"sweep · {self.sweep}", tags={
                Tag.KIND: Kind.SWEEP, Tag.SPEC_DIGEST: spec_digest, Tag.SWEEP: self.sweep,
                Tag.NOTE: f"Sweep **{self.sweep}** (attack-sweep). Its summary and report are written here "
                          "when the sweep ends; the trials are this run's child runs."}).info.run_id
            self.client.log_batch(run_id, params=_params(params))
        self.client.set_tag(run_id, Tag.SCHEMA, str(SCHEMA_VERSION))  # a resumed sweep writes this layout too
        return run_id

    def record_sweep(self, spec: dict[str, Any], provenance: dict[str, str], unit: str,
                     columns: Sequence[str] = ()) -> None:
        """What the sweep run keeps of this `run` of the sweep: the spec (artifact spec.yaml), its
        provenance (tags provenance.<key>, updated by each run; every run's whole set as artifact
        provenance/<UTC time>.json), and the experiment's saved view of its trial runs: kind=trial,
        the cheapest attack first, with the defence, status, budget-to-failure in `unit` and the
        attacker fields in `columns` as columns (MLflow's Views menu: TRIALS_VIEW)."""
        import yaml

        run_id = self.parent_id
        self.client.log_text(run_id, yaml.safe_dump(spec, sort_keys=False), "spec.yaml")
        self.client.log_batch(run_id, tags=[RunTag(PROVENANCE + k, str(v)[:5000]) for k, v in provenance.items()])
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.client.log_text(run_id, json.dumps(provenance, indent=1), f"provenance/{stamp}.json")
        self.client.set_experiment_tag(self.experiment_id, ExperimentTag.VIEW + TRIALS_VIEW,
                                       json.dumps(trials_view(unit, columns)))

    def trial_runs(self, kind: str = Kind.TRIAL) -> dict[str, list]:
        """Every live run of this kind (trials, or a condition's runs) in this experiment, grouped by
        trial_key."""
        runs = self.client.search_runs([self.experiment_id], f"tags.{Tag.KIND} = '{kind}'",
                                       max_results=50_000)
        out: dict[str, list] = {}
        for run in runs:
            if Tag.SUPERSEDED not in run.data.tags:
                out.setdefault(run.data.tags[Tag.TRIAL_KEY], []).append(run)
        return out

    def completed_keys(self, kind: str = Kind.TRIAL, pruned_done: bool = True) -> set[str]:
        """Keys recorded with a final status other than error; every other run of such a key
        (unfinished, errored, or a second final one: the earliest finished is kept, as the
        report does, a measured one before a pruned one) and unfinished or errored runs of the
        other keys are tagged superseded (kept, but out of the report). `pruned_done` False (a
        run without search.prune): a key whose only final run was pruned is left to run again,
        its pruned run kept until the rerun's record supersedes it."""
        done = set()
        for key, runs in self.trial_runs(kind).items():
            final = [r for r in runs if r.data.tags.get(Tag.STATUS) in (*TERMINAL, *CONDITION_STATUSES)]
            kept = min(final, key=kept_first) if final else None
            keep = kept.info.run_id if kept else None
            if kept and not pruned_done and kept.data.tags.get(Tag.STATUS) == "pruned":
                self.pruned_runs[key] = keep  # rerun; superseded once the rerun is recorded
            elif kept:
                done.add(key)
            for run in runs:
                if run.info.run_id != keep:
                    self.client.set_tag(run.info.run_id, Tag.SUPERSEDED, "true")
                    if run.info.status == "RUNNING":
                        self.client.set_terminated(run.info.run_id, "KILLED")
        return done

    def finished_trials(self, defence: str, search_key: str) -> list:
        """This search's finished trial runs against `defence`, in trial-number order."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}' and tags.{Tag.DEFENCE} = '{defence}' and "
            f"tags.{Tag.SEARCH_KEY} = '{search_key}'", max_results=50_000)
        runs = [r for r in runs if Tag.SUPERSEDED not in r.data.tags
                and r.data.tags.get(Tag.STATUS) in TERMINAL]
        return sorted(runs, key=lambda r: (int(r.data.tags.get(Tag.TRIAL_NUMBER, 0)),
                                           r.info.start_time))

    def replace_pruned(self, key: str) -> None:
        """The trial `key`, pruned by an earlier run, is now measured: its pruned run is kept,
        superseded."""
        if (run_id := self.pruned_runs.pop(key, None)) is not None:
            self.client.set_tag(run_id, Tag.SUPERSEDED, "true")

    def abandon(self, run_id: str, reason: str) -> None:
        """A trial attempt whose process died and which Tune retries: kept, out of every count."""
        self.client.log_batch(run_id, tags=[RunTag(Tag.SUPERSEDED, "true"), RunTag(Tag.ERROR, reason[-5000:])])
        self.client.set_terminated(run_id, "KILLED")

    def log_error(self, run_id: str, text: str) -> None:
        """The whole traceback of a trial's error, as artifact error.txt (tag `error` has its last line)."""
        self.client.log_text(run_id, text, "error.txt")

    def start_trial(self, key: str, defence: str, is_base: bool, attacker_id: str,
                    params: dict[str, Any], tags: dict[str, str] | None = None,
                    name: str | None = None) -> str:
        """A trial's run, named `name` (else '<defence> · <attacker_id>')."""
        return self.start_run(Kind.TRIAL, key, defence, is_base, name or f"{defence} · {attacker_id}", params,
                              {Tag.ATTACKER_ID: attacker_id, **(tags or {})})

    def start_run(self, kind: str, key: str, defence: str, is_base: bool, name: str, params: dict[str, Any],
                  tags: dict[str, str] | None = None) -> str:
        """A child run of the sweep run: a trial, or one of a condition's measurements of a defence."""
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={Tag.PARENT: self.parent_id, Tag.KIND: kind, Tag.SWEEP: self.sweep, Tag.DEFENCE: defence,
                  Tag.BASE: str(is_base).lower(), Tag.TRIAL_KEY: key, **(tags or {})})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def finish_run(self, run_id: str, status: str, metrics: dict[str, float], error: str | None = None,
                   tags: dict[str, str] | None = None) -> None:
        """Close a condition's run with its status (error: with its last line), final metrics and tags."""
        now = int(time.time() * 1000)
        tags = [RunTag(Tag.STATUS, status)] + ([RunTag(Tag.ERROR, error[-5000:])] if error else []) + \
            [RunTag(k, v) for k, v in (tags or {}).items()]
        self.client.log_batch(run_id, metrics=[entities.Metric(k, float(v), now, 0) for k, v in metrics.items()
                                               if math.isfinite(float(v))], tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED")

    def set_sweep_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.parent_id, key, value)

    def adversary_run(self, defence: str, search_key: str, params: dict[str, Any]) -> str:
        """The run holding the adversary's progress against `defence` (reused on resume)."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.{Tag.KIND} = '{Kind.ADVERSARY}' and tags.{Tag.DEFENCE} = '{defence}' and "
            f"tags.{Tag.SEARCH_KEY} = '{search_key}'", max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        algorithm = params.get("algorithm")
        run = self.client.create_run(
            self.experiment_id, run_name=f"adversary · {defence}" + (f" ({algorithm})" if algorithm else ""),
            tags={Tag.PARENT: self.parent_id, Tag.KIND: Kind.ADVERSARY, Tag.SWEEP: self.sweep,
                  Tag.DEFENCE: defence, Tag.SEARCH_KEY: search_key})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def log_progress(self, run_id: str, trials: int, compute: float, best: float, objective: float) -> None:
        """The adversary's progress after its `trials`-th trial: the objective it saw, the compute
        spent so far and the cheapest success (when there is one), by trial number."""
        now, n = int(time.time() * 1000), trials
        metrics = [entities.Metric(Metric.OBJECTIVE, objective, now, n),
                   entities.Metric(Metric.CUMULATIVE_COMPUTE, compute, now, n)]
        if math.isfinite(best):
            metrics.append(entities.Metric(Metric.BEST_BTF, best, now, n))
        self.client.log_batch(run_id, metrics=metrics)

    def log_point(self, run_id: str, point: dict[str, Any], buffered: bool = False) -> None:
        """One evaluation's curves (and its samples, as an artifact). `buffered`: the curves wait
        in memory until flush() sends them, at most FLUSH_S later (the samples never wait)."""
        now, step = int(time.time() * 1000), int(point["step"])
        metrics = [entities.Metric(k, float(v), now, step) for k, v in point.items()
                   if is_curve(k) and isinstance(v, (int, float)) and math.isfinite(float(v))]
        if buffered:
            self._pending.setdefault(run_id, (time.monotonic(), []))[1].extend(metrics)
        else:
            self.client.log_batch(run_id, metrics=metrics)
        if isinstance(point.get("samples"), str):  # what the model answered, and every verdict
            status = point.get("status", "running")
            name = f"step_{step}.json" if status == "running" else f"{status}_step_{step}.json"
            self.client.log_text(run_id, point["samples"], f"samples/{name}")

    def flush(self, run_id: str | None = None, due: bool = False) -> None:
        """Send the buffered curves of `run_id` (None: of every run); `due`: only those that
        have waited FLUSH_S."""
        now = time.monotonic()
        for rid in [r for r in self._pending if run_id in (None, r)]:
            since, metrics = self._pending[rid]
            if due and now - since < FLUSH_S:
                continue
            del self._pending[rid]
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(rid, metrics=metrics[i:i + 1000])

    def finish_trial(self, run_id: str, last: dict[str, Any] | None, error: str | None = None,
                     spent: dict[str, float] | None = None, trial_number: int | None = None
                     ) -> str:
        """Record a trial's outcome; `spent` maps each budget unit to the compute it used."""
        status = "error" if error or not last else last.get("status", "error")
        if status not in TERMINAL:
            status, error = "error", error or f"trial ended while still {status!r}"
        now = int(time.time() * 1000)
        metrics = [entities.Metric(k if k == Metric.EVAL_SECONDS_TOTAL else Metric.spent(k), float(v), now, 0)
                   for k, v in (spent or {}).items()]
        if status in SUCCESS:
            metrics += [entities.Metric(Metric.btf(unit), float(last[field]), now, 0)
                        for unit, field in BUDGET_UNITS.items() if field in last]
            metrics.append(entities.Metric(Metric.RESOLUTION, float(last.get("resolution", 0)), now, 0))
        elif status in ("resisted", "pruned", "diverged", "degenerate"):
            metrics.append(entities.Metric(Metric.ended_at(status), float(last["step"]), now, 0))
        for key, value in (last or {}).items():  # each evaluator's own first crossing
            if key.startswith(CROSSING + "."):
                label, field = key[len(CROSSING) + 1:].rsplit(".", 1)
                unit = next((u for u, f in BUDGET_UNITS.items() if f == field), None)
                name = Metric.btf(unit, label) if unit else f"{Metric.RESOLUTION}.{label}"
                metrics.append(entities.Metric(name, float(value), now, 0))
        if status != "error" and last.get(Metric.OBJECTIVE) is not None:
            metrics.append(entities.Metric(Metric.OBJECTIVE, float(last[Metric.OBJECTIVE]), now, 0))
        tags = [RunTag(Tag.STATUS, status)]
        if trial_number is not None:
            tags.append(RunTag(Tag.TRIAL_NUMBER, str(trial_number)))
        if error:
            tags.append(RunTag(Tag.ERROR, error[-5000:]))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED")
        return status

    def close(self, interrupted: bool = False) -> None:
        """End the parent run, and any trial or adversary run the sweep left open."""
        self.flush()
        running = RunStatus.to_string(RunStatus.RUNNING)
        for run in self.client.search_runs([self.experiment_id], f"tags.{Tag.KIND} != '{Kind.SWEEP}'",
                                           max_results=50_000):
            if run.info.status == running:
                self.client.set_terminated(run.info.run_id, "KILLED" if interrupted or
                                           run.data.tags.get(Tag.KIND) == Kind.TRIAL else "FINISHED")
        self.client.set_terminated(self.parent_id, "KILLED" if interrupted else "FINISHED")



def _params(params: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in params.items()]

