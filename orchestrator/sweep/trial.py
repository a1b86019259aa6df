"""One trial, as Tune runs it in its own process: the function trainable. Imports no MLflow and no
Ray at module level (a trial's process loads this module to unpickle the trainable)."""

from __future__ import annotations

import math
import sys
import traceback
from typing import Any

from orchestrator.cluster import last_line
from orchestrator.spec.model import SweepSpec
from orchestrator.sweep.loop import DEFENCE, attack_config, attack_loop, attacker_of, loop_config
from trainables.names import Metric


def run_trial(config: dict[str, Any], *, spec_json: str, storage: str) -> None:
    """The Tune function trainable. An exception from the attack ends the trial with a final
    result {status: error, error: its last line, traceback}, which Tune does not retry.

    With workers > 1 the death of a Ray Train worker also arrives here, as the WorkerGroupError
    trainer.fit() raises once Ray Train has shut the worker group down and removed its placement
    group (see train_workers for what else keeps it from holding later trials up). It is recorded
    as the trial's error, as before, not retried: a rerun would now find the CPUs free, but Tune's
    reruns (and the records they supersede) are tested for a trial whose own process died, not
    for this, and a dead worker would have to be told apart from a worker whose attack raised (a
    rerun would only repeat that) by the per-rank exceptions inside the WorkerGroupError.
    `attack-sweep run` run again retries it."""
    from ray import tune

    try:
        trial(config, spec_json, storage)
    except Exception as err:  # noqa: BLE001 - whatever the attack raised is the trial's error
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)  # the trial's Ray log keeps it too
        tune.report({"status": "error", "error": last_line(text) or type(err).__name__,
                     "traceback": text[-20_000:], "step": 0, Metric.OBJECTIVE: math.nan})


def trial(config: dict[str, Any], spec_json: str, storage: str) -> None:
    """The attack loop, with every evaluation reported along with the searcher's objective
    (provisional until the final evaluation). With workers > 1 the loop runs in each worker of
    a Ray Train TorchTrainer, whose rank-0 reports reach Tune through train_workers."""
    from ray import tune

    spec = SweepSpec.model_validate_json(spec_json)
    cfg = attack_config(spec, {"defence": config[DEFENCE], **attacker_of(spec, config)})
    loop = loop_config(spec, cfg, config[DEFENCE])
    if spec.resources.workers == 1:
        attack_loop(loop, report=tune.report)
        return

    from orchestrator.sweep.train import train_workers  # Ray Train: only with workers > 1

    train_workers(spec, loop, storage, tune.report)
