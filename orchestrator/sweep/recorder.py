"""The Tune callback that records a sweep's trials in MLflow as Tune sees them (Ray imported at
the top: only fit.py imports this)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from orchestrator.cluster import last_line
from orchestrator.echo import amount, say
from orchestrator.sweep.adversary import Progress
from orchestrator.tracking.writer import Tracker
from trainables.names import BUDGET_UNITS, TERMINAL, Metric


class MlflowRecorder(Callback):
    """Records each trial through `tracker`, advances its defence's adversary progress (and logs
    it on that defence's adversary run) as trials finish, and prints a line per trial.
    `describe(config)` gives key, defence, is_base, attacker_id, label, params and tags; `pruned`
    holds the ids of trials the stopper pruned (their last result is still 'running': they are
    recorded as pruned). Written from the driver only, so a stopped or crashed trial never leaves
    a run RUNNING behind."""

    def __init__(self, tracker: Tracker, describe: Callable[[dict], dict[str, Any]], total: int,
                 progresses: dict[str, Progress], adversaries: dict[str, str], pruned: set[str] | None = None,
                 echo: Callable[[str], None] = say, start: int = 0) -> None:
        self.tracker, self.describe, self.total, self.echo = tracker, describe, total, echo
        self.progresses, self.adversaries = progresses, adversaries
        self.pruned: set[str] = pruned if pruned is not None else set()
        self.runs: dict[str, str] = {}
        self.spent: dict[str, dict[str, float]] = {}
        self.finished = start

    def on_trial_start(self, iteration, trials, trial, **info):
        d = self.describe(trial.config)
        self.runs[trial.trial_id] = self.tracker.start_trial(
            d["key"], d["defence"], d["is_base"], d["attacker_id"], d["params"], d["tags"], d.get("name"))
        self.spent[trial.trial_id] = dict.fromkeys([*BUDGET_UNITS, "eval_seconds_total"], 0.0)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == "error":  # the trial's own exception: recorded by _end
            return
        self.tracker.log_point(self.runs[trial.trial_id], result, buffered=True)
        self.tracker.flush(due=True)
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
        if error is None and last and trial.trial_id in self.pruned and last.get("status") == "running":
            last = {**last, "status": "pruned"}
        d = self.describe(trial.config)
        progress = self.progresses[d["defence"]]
        if error is None and last and last.get("status") == "error":  # reported by the trial itself
            error = str(last.get("error") or "trial failed")
            if last.get("traceback"):
                self.tracker.log_error(run_id, str(last["traceback"]))
        number = None
        if not error and last and last.get("status") in TERMINAL:
            number = progress.trials + 1
            btf = last.get(BUDGET_UNITS[progress.unit])
            progress.add(last["status"], spent[progress.unit], btf)
            self.tracker.log_progress(self.adversaries[d["defence"]], progress.trials, progress.compute,
                                      progress.best, float(last.get(Metric.OBJECTIVE, math.nan)))
        self.tracker.flush(run_id)
        status = self.tracker.finish_trial(run_id, last, error, spent, number)
        if status in TERMINAL and status != "pruned":
            self.tracker.replace_pruned(d["key"])
        self.finished += 1
        best = (f"best so far {_amount(progress.best, progress.unit)} after "
                f"{_amount(progress.compute, progress.unit)} spent")
        self.echo(f"[{self.finished}/{self.total}] {_summary(d, last, status, error)}"
                  f" | {best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, _error_text(trial))

    def on_step_end(self, iteration, trials, **info):
        self.tracker.flush(due=True)  # a trial between evaluations still shows its last ones

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's process died and Tune will rerun it: this attempt's run is closed,
        superseded; on_trial_start gives the rerun a fresh one."""
        run_id = self.runs.pop(trial.trial_id, None)
        self.spent.pop(trial.trial_id, None)
        if run_id is None:
            return
        reason = _error_text(trial)
        failures = trial.run_metadata.num_failures
        self.tracker.flush(run_id)
        self.tracker.abandon(run_id, f"attempt {failures} lost ({reason}); the trial was rerun")
        d = self.describe(trial.config)
        self.echo(f"[retry] {d['defence']:<12} {d['label']}: the trial's process died ({reason.split('. ')[0]}); "
                  f"rerunning it (retry {failures} of {trial.max_failures})")


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
