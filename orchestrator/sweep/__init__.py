"""The sweep: every defence against the adversary's attackers, as Ray Tune trials recorded in
MLflow.

    from orchestrator import spec, sweep
    swept = sweep.run(spec.load("search_spaces/quickstart.yaml"), tracking_uri="sqlite:///mlflow.db")
    swept.experiment_id, swept.published.text, swept.errored

The names below are imported on first use (PEP 562): a trial's process imports
orchestrator.sweep.trial, which must not pay for the driver (MLflow, the report).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.lazy import exports

_HOMES = {
    "run": "orchestrator.sweep.driver",
    "diagnose": "orchestrator.sweep.driver",
    "build": "orchestrator.sweep.driver",
    "Swept": "orchestrator.sweep.driver",
    "SweepLocked": "orchestrator.sweep.lock",
    "sweep_lock": "orchestrator.sweep.lock",
    "spec_digest": "orchestrator.sweep.keys",
    "search_key": "orchestrator.sweep.keys",
    "trial_key": "orchestrator.sweep.keys",
    "trials": "orchestrator.sweep.keys",
    "attack_config": "orchestrator.sweep.loop",
}

__all__ = ["Swept", "SweepLocked", "attack_config", "build", "diagnose", "run", "search_key", "spec_digest",
           "sweep_lock", "trial_key", "trials"]

if TYPE_CHECKING:
    from orchestrator.sweep.driver import Swept, build, diagnose, run
    from orchestrator.sweep.keys import search_key, spec_digest, trial_key, trials
    from orchestrator.sweep.lock import SweepLocked, sweep_lock
    from orchestrator.sweep.loop import attack_config


__getattr__, __dir__ = exports(__name__, _HOMES)
