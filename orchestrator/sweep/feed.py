"""The Tune callback that tells the live display what a sweep's trials do (Ray imported at the
top: only fit.py imports this)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from orchestrator.sweep.progress import Display


class ProgressFeed(Callback):
    """Tells `display` what the sweep's trials do. `describe(config)` gives defence, label and
    params (params["max_steps"]: the trial's T)."""

    def __init__(self, display: Display, describe: Callable[[dict], dict[str, Any]]) -> None:
        self.display, self.describe = display, describe

    def on_trial_start(self, iteration, trials, trial, **info):
        d = self.describe(trial.config)
        self.display.trial_started(trial.trial_id, d["defence"], d["label"], d["params"].get("max_steps"))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.display.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self.display.trial_finished(trial.trial_id, error=last.get("status") == "error")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.display.trial_finished(trial.trial_id, error=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.display.trial_lost(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        self.display.tick()  # Tune's loop steps at least every second: the plain heartbeat's clock

    def on_experiment_end(self, trials, **info):
        self.display.end()

