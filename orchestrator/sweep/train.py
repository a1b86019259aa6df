"""A multi-worker trial: its attack loop in the workers of a Ray Train TorchTrainer, rank 0's
reports passed on to Tune (Ray imported at the top: only trial.py imports this, in a trial with
workers > 1)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Empty, Queue

from orchestrator.spec.model import SweepSpec
from orchestrator.sweep.loop import GROUP, attack_loop

FINISH_S = 60.0
"""How long a multi-worker trial's final result waits for its workers to end (they end within a
few seconds of it: their loop is over)."""


class Forward(UserCallback):
    """Runs in the Train controller: passes rank 0's report on through the queue."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put(metrics[0])


def train_workers(spec: SweepSpec, loop: dict[str, Any], storage: str, report: Callable[[dict], None]) -> None:
    """One trial's loop in the workers of a Ray Train TorchTrainer. Rank 0's reports reach Tune
    through this thread, the final one once trainer.fit() has returned.

    Why, as measured on Ray 2.60 (tests/test_faults.py kills a worker of a 2-worker trial):
      - Ray's TuneReportCallback hands rank 0's reports to Tune's own thread, which puts them in
        the one-slot queue this thread's reports go to as well. A report still waiting when fit()
        ended (on a worker's death, or after the last point) met the trial's error or last result
        in that queue, and both threads waited on it for ever: the trial never ended, and with its
        slot held no later trial started. Here one thread reports everything, in order.
      - Tune stops a trial at its final result and, once the sweep is over, ends its process
        without waiting. A fit() still running dies with it, and its worker group's placement
        group stays CREATED, its CPUs held until the driver exits: Ray Train's own cleaner learns
        of the controller's death through the Ray State API, which needs a dashboard (the sweep's
        local Ray has none). The final result waits for fit() to return, having removed the group
        itself, as it does before it raises a worker's death (a WorkerGroupError).
    Where fit() is still running when the trial ends (Tune stopped it before its final result,
    or the workers did not end within FINISH_S of it), the placement group rank 0 named in its
    first report is removed here: that group is this trial's alone, and its workers end with it."""

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # reports reach Tune at once
    r = spec.resources
    reports = Queue(actor_options={"num_cpus": 0})  # unbounded: the controller never waits on Tune
    trainer = TorchTrainer(
        attack_loop, train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if r.gpu > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpu > 0,
            resources_per_worker={"CPU": r.cpu, **({"GPU": r.gpu} if r.gpu else {})}),
        run_config=ray.train.RunConfig(name=f"{tune.get_context().get_trial_name()}-train",
                                       storage_path=storage, callbacks=[Forward(reports)]))
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again in the trial's thread
            failed.append(err)

    group: list[str] = []

    def release() -> None:
        if fitter.is_alive() and group:
            with contextlib.suppress(Exception):  # already removed: nothing to do
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group[0])))

    fitter = threading.Thread(target=fit, name="trainer.fit", daemon=True)
    fitter.start()
    final, deadline = None, math.inf
    try:
        while time.monotonic() < deadline:
            over = not fitter.is_alive()  # read before the get: an empty queue then holds no more
            try:
                result = reports.get(timeout=0.2)
            except Empty:
                if over:
                    break
                continue
            if GROUP in result:
                group.append(result.pop(GROUP))
            if result.get("status", "running") == "running":
                report(result)
            else:
                final, deadline = result, time.monotonic() + FINISH_S
        release()
        if final is not None:  # the attack's outcome, even if the workers' shutdown failed after it
            report(final)
        elif failed:
            raise failed[0]
    finally:
        release()  # Tune stopped the trial mid-run: its report raised SystemExit
        with contextlib.suppress(Exception):
            reports.shutdown()
