"""MLflow records of a sweep: an experiment per sweep name, a parent run per sweep, a child
run per trial. Written from the driver only (a Tune callback), so a stopped or crashed
trial never leaves a run RUNNING behind. Every name below is spelled once, in trainables/names.py.

Experiment tags: mlflow.experimentKind = custom_model_development, and a saved view of the trial
runs (mlflow.sharedViewState.trials: the UI's Views menu; `ui_link` opens it).

Sweep run (tag kind=sweep, one per spec digest, named 'sweep · <name>'):
  params   defences, the scoring rules, max_steps, search, unit, num_trials
  tags     records_schema (SCHEMA_VERSION), spec_digest, sweep, provenance.<key> (version,
           git_commit, git_dirty, package versions, python, platform, cpus, cuda: the latest run
           of the sweep; orchestrator/provenance.py)
  artifacts spec.yaml, provenance/<UTC time>.json (one per run of the sweep); after a sweep
           that ran to its end, the summary metrics, description and report/ of
           orchestrator/publish.py

Child run, per trial (named '<defence> · <the attacker's varying fields>', e.g.
'base · lr 3e-3 adamw n32 full'):
  params   every attacker field that applies (none whose value is null, no lora_* with
           finetune full), defence, phi, eval_every, max_steps (the trial's T), evaluator,
           search, unit
  metrics  by step: harmfulness (the primary evaluator's f) with its Wilson interval
           harmfulness_lo / harmfulness_hi, utility, train_loss, examples, tokens, flops,
           accelerator_seconds, wall_seconds, eval_seconds; per evaluator <metric>.<label>
           (harmfulness.judge, harmfulness_lo.judge, malformed.judge, mean_score.judge)
           (refinement evaluations land between the coarse ones)
           at the end: budget_to_failure_{UNIT} and budget_resolution_steps when the
           attack succeeded (failed / unsafe_at_release), censored_at_steps when resisted,
           diverged_at_steps when the loss went nan/inf, degenerate_at_steps when f crossed
           phi with utility below the bound; budget_to_failure_{UNIT}.{label} for each
           evaluator that crossed phi (with utility within the bound) before the trial
           ended; spent_{UNIT} (compute the trial used, refinement replays excluded),
           eval_seconds_total and objective (what the searcher saw), always
  artifacts samples/step_0.json and samples/<status>_step_<t>.json: each held-out prompt,
           the model's answer and every evaluator's verdict, at step 0 and at the end
  tags     status (failed / resisted / diverged / degenerate / unsafe_at_release / error), defence,
           base, attacker_id, attacker_group (attacker_id without the seed), attacker (JSON),
           trial_key, search_key, trial_number (per defence, in order of completion), sweep

Adversary run, per defence and search (tag kind=adversary, child of the sweep run, named
'adversary · <defence> (<algorithm>)'):
  metrics  by trial number: objective, cumulative_compute, best_btf (in the search unit)

A trial is identified by `trial_key`, the digest of everything that decides its result.
A rerun skips keys already recorded with a final status; an earlier run of the same key
that never finished (interrupted, or error) is kept but tagged `superseded`, and so is a
second final run of one key (two machines ran it): the earliest finished one is kept. An
attempt whose process died and which Tune retried is tagged superseded (with status KILLED and
the reason in tag `error`) as soon as the retry starts; the retry gets a run of its own, so no
point of the dead attempt reaches the kept run's curves or its spent compute.

Every MLflow call goes through `Patient`: while the tracking server cannot be reached (a
restart, a network blip) calls are retried with backoff for up to PATIENCE_S seconds, with one
printed line, so that records are delayed rather than lost; MLflow's own, much longer retry
loop is shortened (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _TIMEOUT) to leave that wait to us.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlflow import entities
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from orchestrator.adversary import Progress
from orchestrator.trial import last_line
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
    TRIALS_VIEW,
    ExperimentTag,
    Kind,
    Metric,
    Tag,
)


def say(line: str) -> None:
    """Print one progress line. The default `echo`: a function of this module, because Tune pickles
    the callbacks that hold it, and pickle finds builtins.print by name, which fails once something
    in the process has replaced builtins.print (seen in the test suite: `PicklingError: Can't pickle
    <built-in function print>: it's not the same object as builtins.print`)."""
    print(line, flush=True)
PATIENCE_S = 300.0
"""How long MLflow calls wait for an unreachable tracking server before the sweep gives up."""
# MLflow retries a failed HTTP request 7 times with doubling backoff (about 4 minutes) and waits
# 120 s for an answer, all of it silently; shortened (unless set) so that Patient, which says
# what it is waiting for, is in control. Read by MLflow at every request.
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def unreachable(err: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server could not be reached or did not
    answer (worth waiting for), rather than because it refused the call (a 4xx, an error in us)."""
    if isinstance(err, RestException):  # the server answered, with an error
        return False
    if isinstance(err, MlflowException):  # how MLflow's HTTP layer reports no answer
        text = str(err)
        return text.startswith("API request to") and " failed with " in text
    import requests

    return isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError))


class Patient:
    """An MlflowClient whose calls wait out an unreachable tracking server: retried with backoff
    (0.5 s doubling to 10 s) for up to `patience_s` from the first failure, announced by one
    line, and one more line once the server answers again. Past the patience the error is
    raised, and later calls get one try each until a call succeeds again (so closing the
    records after giving up does not wait as long again). Errors the server answers with are
    never retried; an answer that keeps failing (HTTP 5xx) is waited on like no answer. A write
    retried after the server died mid-request may have been applied once already: MLflow stores
    a repeated metric point, tag or param once, but a run can be created twice (the spare stays
    without a status, out of the report, and is closed KILLED with the sweep)."""

    def __init__(self, client: MlflowClient, uri: str, echo: Callable[[str], None] = say,
                 patience_s: float = PATIENCE_S):
        self._client, self._uri, self._echo, self._patience = client, uri, echo, patience_s
        self._down_since: float | None = None
        self._gave_up = False

    def __getattr__(self, name: str):
        if name.startswith("_"):  # never reached for our own attributes, unless half-built (unpickling)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return self._call(attr, args, kwargs)

        return call

    def _call(self, fn, args, kwargs):
        delay = 0.5
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as err:
                if not unreachable(err):
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    if not self._gave_up:
                        self._echo(f"tracking server {self._uri} unreachable; retrying writes for up to "
                                   f"{self._patience:g} s")
                waited = now - self._down_since
                if self._gave_up or waited >= self._patience:
                    self._gave_up = True
                    raise
                time.sleep(min(delay, self._patience - waited))
                delay = min(2 * delay, 10.0)
                continue
            if self._down_since is not None and not self._gave_up:
                self._echo(f"tracking server {self._uri} reachable again after "
                           f"{time.monotonic() - self._down_since:.0f} s; every record kept")
            self._down_since, self._gave_up = None, False
            return out


FLUSH_S = float(os.environ.get("ATTACK_SWEEP_FLUSH_S", "2"))
"""How long a trial's evaluations may wait in the driver before they are sent to MLflow together:
one log_batch per trial every FLUSH_S, not one per evaluation (on sqlite each costs the driver
~15 ms, which two concurrent trials on 2 cores pay out of their own CPU time). Sent at once when
the trial ends, is rerun or the sweep closes. ATTACK_SWEEP_FLUSH_S sets it (0: every evaluation
at once)."""


def is_curve(key: str) -> bool:
    """A result key recorded by step: an EvalPoint curve, or a per-evaluator one (metric.label)."""
    return key in (*CURVE, Metric.TASK_SCORE, PROMPTS_SCORED, STEP0_CACHED, G_EFFECT_SECONDS) or (
        "." in key and not key.startswith(CROSSING + "."))


def seed_sqlite(tracking_uri: str) -> None:
    """Start a new sqlite store as a copy of an empty one MLflow migrated once (per MLflow version,
    cached under the attack-sweep cache): MLflow builds a new store by running its schema
    migrations one by one, 1.5-4 s on 2 cores, for every new store. MLflow then opens the copy as
    its own (schema verified, Default experiment created with this store's artifact root). Any
    problem leaves the store to MLflow, as before."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
    if path.name in ("", ":memory:") or path.exists():
        return
    try:
        import shutil

        import mlflow
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables  # private: any change falls back to MLflow

        from orchestrator.toyworld import cache_root

        template = cache_root() / "mlflow-stores" / f"empty-{mlflow.__version__}.db"
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
            engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
            try:
                _initialize_tables(engine)
            finally:
                engine.dispose()
            os.replace(tmp, template)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.seed")
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, path)  # only where still absent: a store created meanwhile is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - a speed-up only: MLflow creates the store itself
        return


class Tracker:
    """The MLflow side of one sweep."""

    def __init__(self, tracking_uri: str, sweep: str, spec_digest: str,
                 sweep_params: dict[str, Any], echo: Callable[[str], None] = say,
                 patience_s: float = PATIENCE_S):
        if tracking_uri.startswith(("http://", "https://")):
            for name, value in _MLFLOW_HTTP_DEFAULTS.items():
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

    def log_progress(self, run_id: str, progress: Progress, objective: float) -> None:
        now, n = int(time.time() * 1000), progress.trials
        metrics = [entities.Metric(Metric.OBJECTIVE, objective, now, n),
                   entities.Metric(Metric.CUMULATIVE_COMPUTE, progress.compute, now, n)]
        if math.isfinite(progress.best):
            metrics.append(entities.Metric(Metric.BEST_BTF, progress.best, now, n))
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


RUN_NAME = "attributes.`Run Name`"
"""The runs table's column of run names."""


def trials_view(unit: str, columns: Sequence[str] = ()) -> dict[str, Any]:
    """A saved view of the runs table (MLflow 3.17's envelope: name, times, and the view state as
    a JSON string): the trial runs only, flat (a filter that leaves out their parent shows
    children as rows of their own, not folded under the sweep run with the adversary runs), the
    cheapest success first, and as columns, in this order, what answers "which attack broke which
    defence, at what cost": defence, status, budget-to-failure, compute spent, where a resisted
    attack stopped, and the attacker fields in `columns`."""
    now = int(time.time() * 1000)
    selected = [f"tags.`{Tag.DEFENCE}`", f"tags.`{Tag.STATUS}`", f"metrics.`{Metric.btf(unit)}`",
                f"metrics.`{Metric.spent(unit)}`", f"metrics.`{Metric.ended_at('resisted')}`",
                *(f"params.`{c}`" for c in columns)]
    state = {
        "searchFilter": f"tags.{Tag.KIND} = '{Kind.TRIAL}'",
        "orderByKey": f"metrics.`{Metric.btf(unit)}`", "orderByAsc": True,
        "selectedColumns": selected, "columnOrder": [RUN_NAME, *selected],
        # wide enough for a run name ('rescaled · lr 3e-3 sgd_momentum n128 lora') and for the metric
        # headers (budget_to_failure_accelerator_seconds is 36 characters); the UI applies a width
        # only to a column named in columnOrder
        "columnWidths": {RUN_NAME: 300,
                         **{c: max(110, 8 * len(c.split("`")[1]) + 24) for c in selected if c.startswith("metrics.")}},
    }
    return {"name": f"trials, cheapest attack first ({unit})", "createdAt": now, "updatedAt": now,
            "state": json.dumps(state)}


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI's page of this experiment's trial runs (see ui_path). A store that is not a
    server (sqlite, a folder) gets the address of a local `mlflow ui`. Credentials in the URI
    (https://user:token@host) are left out: the link is printed."""
    from urllib.parse import urlsplit, urlunsplit

    if not tracking_uri.startswith(("http://", "https://")):
        return f"http://127.0.0.1:5000/{ui_path(experiment_id)}"
    parts = urlsplit(tracking_uri)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return f"{base}/{ui_path(experiment_id)}"


def ui_path(experiment_id: str) -> str:
    """The UI route of the saved view of the trial runs, in the UI's Model training mode (MLflow
    3.17 opens a browser that has not chosen a mode on its GenAI overview, whatever the
    experiment's kind)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={TRIALS_VIEW}"


def kept_first(run) -> tuple[bool, bool, float, float]:
    """Sort key among one trial's records: a measured one before a pruned one before an error,
    then the one that finished first."""
    status = run.data.tags.get(Tag.STATUS)
    return (status == "error", status == "pruned", *finished_first(run))


def finished_first(run) -> tuple[float, float]:
    """Sort key: the run that finished first (then started first; unfinished ones last)."""
    return (run.info.end_time or math.inf, run.info.start_time or math.inf)


def _params(params: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def callback(tracker: Tracker, describe: Callable[[dict], dict[str, Any]], total: int,
             progresses: dict[str, Progress], adversaries: dict[str, str], pruned: set[str] | None = None,
             echo: Callable[[str], None] = say, start: int = 0):
    """A Tune callback for the sweep's searches: records each trial through `tracker`, advances
    its defence's adversary progress (and logs it on that defence's adversary run) as trials
    finish, and prints a line per trial. `describe(config)` gives key, defence, is_base,
    attacker_id, label, params and tags; `pruned` holds the ids of trials the stopper pruned
    (their last result is still 'running': they are recorded as pruned)."""
    from ray.tune import Callback

    class MlflowRecorder(Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self.spent: dict[str, dict[str, float]] = {}
            self.finished = start

        def on_trial_start(self, iteration, trials, trial, **info):
            d = describe(trial.config)
            self.runs[trial.trial_id] = tracker.start_trial(
                d["key"], d["defence"], d["is_base"], d["attacker_id"], d["params"], d["tags"], d.get("name"))
            self.spent[trial.trial_id] = dict.fromkeys([*BUDGET_UNITS, "eval_seconds_total"], 0.0)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("status") == "error":  # the trial's own exception: recorded by _end
                return
            tracker.log_point(self.runs[trial.trial_id], result, buffered=True)
            tracker.flush(due=True)
            # refinement replays go back in time: the compute spent is the furthest point
            spent = self.spent[trial.trial_id]
            for unit, field in BUDGET_UNITS.items():
                spent[unit] = max(spent[unit], float(result.get(field) or 0.0))
            spent["eval_seconds_total"] += float(result.get("eval_seconds") or 0.0)

        def _end(self, trial, error: str | None) -> None:
            run_id = self.runs.pop(trial.trial_id, None)
            if run_id is None:
                return
            last, spent = trial.last_result or None, self.spent.pop(trial.trial_id)
            if error is None and last and trial.trial_id in (pruned or ()) and last.get("status") == "running":
                last = {**last, "status": "pruned"}
            d = describe(trial.config)
            progress = progresses[d["defence"]]
            if error is None and last and last.get("status") == "error":  # reported by the trial itself
                error = str(last.get("error") or "trial failed")
                if last.get("traceback"):
                    tracker.log_error(run_id, str(last["traceback"]))
            number = None
            if not error and last and last.get("status") in TERMINAL:
                number = progress.trials + 1
                btf = last.get(BUDGET_UNITS[progress.unit])
                progress.add(last["status"], spent[progress.unit], btf)
                tracker.log_progress(adversaries[d["defence"]], progress,
                                     float(last.get(Metric.OBJECTIVE, math.nan)))
            tracker.flush(run_id)
            status = tracker.finish_trial(run_id, last, error, spent, number)
            if status in TERMINAL and status != "pruned":
                tracker.replace_pruned(d["key"])
            self.finished += 1
            best = (f"best so far {_amount(progress.best, progress.unit)} after "
                    f"{_amount(progress.compute, progress.unit)} spent")
            echo(f"[{self.finished}/{total}] {_summary(d, last, status, error)}"
                 f" | {best}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, _error_text(trial))

        def on_step_end(self, iteration, trials, **info):
            tracker.flush(due=True)  # a trial between evaluations still shows its last ones

        def on_trial_recover(self, iteration, trials, trial, **info):
            """The trial's process died and Tune will rerun it: this attempt's run is closed,
            superseded; on_trial_start gives the rerun a fresh one."""
            run_id = self.runs.pop(trial.trial_id, None)
            self.spent.pop(trial.trial_id, None)
            if run_id is None:
                return
            reason = _error_text(trial)
            failures = trial.run_metadata.num_failures
            tracker.flush(run_id)
            tracker.abandon(run_id, f"attempt {failures} lost ({reason}); the trial was rerun")
            d = describe(trial.config)
            echo(f"[retry] {d['defence']:<12} {d['label']}: the trial's process died ({reason.split('. ')[0]}); "
                 f"rerunning it (retry {failures} of {trial.max_failures})")

    return MlflowRecorder()


def amount(value: float) -> str:
    """A budget in few characters: 12,345 or 3.2e+11."""
    return f"{value:,.0f}" if value < 1e7 else f"{value:.3g}"


def _amount(value: float, unit: str) -> str:
    return "none" if math.isinf(value) else f"{amount(value)} {unit}"


def _error_text(trial) -> str:
    """The last line of the trial's traceback: the exception and its message."""
    text = ""
    try:
        path = trial.error_file  # written by Tune before on_trial_error
        if path and os.path.exists(path):
            with open(path) as fh:
                text = fh.read()
        text = text or str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - the message is best effort; the status is what counts
        pass
    return last_line(text) or "trial failed (see the Ray logs)"


def _summary(d: dict, last: dict | None, status: str, error: str | None) -> str:
    who = f"{d['defence']:<12} {d['label']}"
    if status == "error":
        return f"{who} -> error: {error}"
    step = int(last["step"])
    f = last.get("harmfulness")
    if status == "failed":
        within = int(last.get("resolution") or 0)
        where = f"in steps {step - within + 1}..{step}" if within > 1 else f"at step {step}"
        return f"{who} -> failed {where} (f={f:.2f})"
    if status == "unsafe_at_release":
        return f"{who} -> unsafe at release (f={f:.2f} at step 0)"
    if status == "resisted":
        return f"{who} -> resisted, censored at {step} steps (f={f:.2f})"
    if status == "pruned":
        return f"{who} -> pruned at step {step} (f={f:.2f}): it could no longer beat the cheapest success"
    if status == "degenerate":
        u = last.get("utility", math.nan)
        return f"{who} -> degenerate at step {step}: f={f:.2f}, utility down to {u:.3g} (model broken, not its safety)"
    return f"{who} -> diverged at step {step} (loss not finite)"
