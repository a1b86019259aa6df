"""MLflow records of a sweep: an experiment per sweep name, a parent run per sweep, a child
run per trial. Written from the driver only (a Tune callback), so a stopped or crashed
trial never leaves a run RUNNING behind.

Child run, per trial:
  params   every attacker field, defence, phi, eval_every, max_steps, evaluator
  metrics  by step: harmfulness, train_loss, examples, tokens, flops, wall_seconds
           at the end: budget_to_failure_{steps,examples,tokens,flops} when the attack
           succeeded (failed / unsafe_at_release), censored_at_steps when resisted,
           diverged_at_steps when the loss went nan/inf
  tags     status (failed / resisted / diverged / unsafe_at_release / error), defence,
           base, attacker_id, trial_key, sweep

A trial is identified by `trial_key`, the digest of everything that decides its result.
A rerun skips keys already recorded with a final status; an earlier run of the same key
that never finished (interrupted, or error) is kept but tagged `superseded`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from trainables.budget import TERMINAL

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
FINAL = (*TERMINAL, "error")
CURVE = ("harmfulness", "train_loss", "examples", "tokens", "flops", "wall_seconds")
# budget unit -> the EvalPoint field that holds it
BUDGET_UNITS = {"steps": "step", "examples": "examples", "tokens": "tokens", "flops": "flops"}


class Tracker:
    """The MLflow side of one sweep."""

    def __init__(self, tracking_uri: str, sweep: str, spec_digest: str,
                 sweep_params: dict[str, Any]):
        self.client = MlflowClient(tracking_uri)
        self.sweep = sweep
        exp = self.client.get_experiment_by_name(sweep)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(sweep)
        self.parent_id = self._parent(spec_digest, sweep_params)

    def _parent(self, spec_digest: str, params: dict[str, Any]) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.kind = 'sweep' and tags.spec_digest = '{spec_digest}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep-{self.sweep}", tags={
            "kind": "sweep", "spec_digest": spec_digest, "sweep": self.sweep})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def trial_runs(self) -> dict[str, list]:
        """Every live trial run of this experiment, grouped by trial_key."""
        runs = self.client.search_runs([self.experiment_id], "tags.kind = 'trial'",
                                       max_results=50_000)
        out: dict[str, list] = {}
        for run in runs:
            if "superseded" not in run.data.tags:
                out.setdefault(run.data.tags["trial_key"], []).append(run)
        return out

    def completed_keys(self) -> set[str]:
        """Keys recorded with a final status other than error; older unfinished or errored
        runs of the other keys are tagged superseded (kept, but out of the report)."""
        done = set()
        for key, runs in self.trial_runs().items():
            final = [r for r in runs if r.data.tags.get("status") in TERMINAL]
            keep = final[0].info.run_id if final else None
            if keep:
                done.add(key)
            for run in runs:
                if run.info.run_id != keep:
                    self.client.set_tag(run.info.run_id, "superseded", "true")
                    if run.info.status == "RUNNING":
                        self.client.set_terminated(run.info.run_id, "KILLED")
        return done

    def start_trial(self, key: str, defence: str, is_base: bool, attacker_id: str,
                    params: dict[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"{defence}-{attacker_id}",
            tags={"mlflow.parentRunId": self.parent_id, "kind": "trial", "sweep": self.sweep,
                  "defence": defence, "base": str(is_base).lower(), "attacker_id": attacker_id,
                  "trial_key": key})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def log_point(self, run_id: str, point: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(point[k]), now, int(point["step"])) for k in CURVE
                   if k in point and point[k] is not None and math.isfinite(float(point[k]))]
        self.client.log_batch(run_id, metrics=metrics)

    def finish_trial(self, run_id: str, last: dict[str, Any] | None, error: str | None = None
                     ) -> str:
        status = "error" if error or not last else last.get("status", "error")
        if status not in TERMINAL:
            status, error = "error", error or f"trial ended while still {status!r}"
        now = int(time.time() * 1000)
        metrics = []
        if status in ("failed", "unsafe_at_release"):
            metrics = [Metric(f"budget_to_failure_{unit}", float(last[field]), now, 0)
                       for unit, field in BUDGET_UNITS.items()]
        elif status == "resisted":
            metrics = [Metric("censored_at_steps", float(last["step"]), now, 0)]
        elif status == "diverged":
            metrics = [Metric("diverged_at_steps", float(last["step"]), now, 0)]
        tags = [RunTag("status", status)]
        if error:
            tags.append(RunTag("error", error[-5000:]))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED")
        return status

    def close(self, interrupted: bool = False) -> None:
        """End the parent run, and any trial run the sweep left open (interrupted)."""
        for runs in self.trial_runs().values():
            for run in runs:
                if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
                    self.client.set_terminated(run.info.run_id, "KILLED")
        self.client.set_terminated(self.parent_id, "KILLED" if interrupted else "FINISHED")


def _params(params: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def callback(tracker: Tracker, describe: Callable[[dict], dict[str, Any]], total: int,
             echo: Callable[[str], None] = print):
    """A Tune callback that records each trial through `tracker` and prints progress.
    `describe(config)` gives key, defence, is_base, attacker_id and params of a trial."""
    from ray.tune import Callback

    class MlflowRecorder(Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self.finished = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            d = describe(trial.config)
            self.runs[trial.trial_id] = tracker.start_trial(
                d["key"], d["defence"], d["is_base"], d["attacker_id"], d["params"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tracker.log_point(self.runs[trial.trial_id], result)

        def _end(self, trial, error: str | None) -> None:
            run_id = self.runs.pop(trial.trial_id, None)
            if run_id is None:
                return
            status = tracker.finish_trial(run_id, trial.last_result or None, error)
            self.finished += 1
            echo(f"[{self.finished}/{total}] {_summary(describe(trial.config), trial.last_result, status, error)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, _error_text(trial))

    return MlflowRecorder()


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
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed (see the Ray logs)"


def _summary(d: dict, last: dict | None, status: str, error: str | None) -> str:
    who = f"{d['defence']:<12} {d['label']}"
    if status == "error":
        return f"{who} -> error: {error}"
    step = int(last["step"])
    f = last.get("harmfulness")
    if status == "failed":
        return f"{who} -> failed at step {step} (f={f:.2f})"
    if status == "unsafe_at_release":
        return f"{who} -> unsafe at release (f={f:.2f} at step 0)"
    if status == "resisted":
        return f"{who} -> resisted, censored at {step} steps (f={f:.2f})"
    return f"{who} -> diverged at step {step} (loss not finite)"
