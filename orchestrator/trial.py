"""One trial, as Tune runs it in its own process: the function trainable and the attack loop it
drives. Imports no MLflow and no Ray at module level (a trial's process loads this module to
unpickle the trainable): spec, space, the objective and trainables only."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from orchestrator.adversary import objective
from orchestrator.space import decode, max_horizon
from orchestrator.spec import SweepSpec
from trainables.config import AttackConfig, Evaluation
from trainables.names import Metric


def last_line(text: str) -> str:
    """The last non-blank line of a traceback: the exception and its message ('' if none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def attack_config(spec: SweepSpec, trial: dict[str, Any]) -> AttackConfig:
    """The trainable's config for one trial {defence, **attacker} of this sweep."""
    defence = next(d for d in spec.defences if d.name == trial["defence"])
    return AttackConfig(
        checkpoint=defence.checkpoint(),
        attacker={k: v for k, v in trial.items() if k != "defence"},
        deepspeed=spec.distributed,
        **{name: getattr(spec, name) for name in Evaluation.model_fields},
    )


def attacker_of(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The attacker of a Tune trial config (adaptive searchers carry encoded values)."""
    return decode(spec.space, config) if spec.adaptive else \
        {k: v for k, v in config.items() if k != "defence"}


DEFENCE, SAFE = "defence", "safe"
"""Keys each trial adds to the results it reports: its defence, and whether the evaluation was
safe (f did not cross phi: a crossing, if the trial reaches one, lies beyond this budget)."""

GROUP = "_placement_group"
"""Key of a Ray Train worker's first report naming its worker group's placement group (hex id),
which train_workers takes out before the report reaches Tune."""

FINISH_S = 60.0
"""How long a multi-worker trial's final result waits for its workers to end (they end within a
few seconds of it: their loop is over)."""


WORKER_RETRIES = 2
"""How many times Tune reruns a trial whose process died (tune.FailureConfig.max_failures). Only
the death of the trial's own process reaches Tune as a failure: run_trial reports whatever the
attack raises as the trial's error, so this retries the crashes a rerun can survive (SIGKILL, the
OOM killer, a lost node), never a bug or bad data, which would only fail again."""


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

    train_workers(spec, loop, storage, tune.report)


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
    import threading
    import time

    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.callback import UserCallback
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.queue import Empty, Queue

    class Forward(UserCallback):
        """Runs in the Train controller: passes rank 0's report on through the queue."""

        def __init__(self, queue: Queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            self.queue.put(metrics[0])

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


def loop_config(spec: SweepSpec, cfg, defence: str) -> dict[str, Any]:
    """What one trial's loop needs, as plain data (it crosses into Ray Train workers)."""
    return {"cfg": cfg.model_dump_json(), "unit": spec.search.unit, "penalty": spec.search.penalty,
            "t_max": max_horizon(spec.space, spec.max_steps), "threads": max(1, int(spec.resources.cpu)),
            "defence": defence}


def attack_loop(loop_config: dict[str, Any], report: Callable[[dict], None] | None = None) -> None:
    """One trial's attack, in a Tune trial or in each worker of its TorchTrainer."""
    from trainables import AttackConfig, run_attack

    cfg = AttackConfig.model_validate_json(loop_config["cfg"])
    if report is None:  # a Ray Train worker: its own device, and reports through Ray Train
        import ray.train
        import ray.train.torch

        report = _naming_group(ray.train.report)
        if cfg.device != "cpu" and ray.train.torch.get_device().type == "cuda":
            cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device())})
    unit, penalty, t_max = loop_config["unit"], loop_config["penalty"], loop_config["t_max"]
    # As many torch threads as CPUs reserved: torch's default (every core) oversubscribes the
    # machine as soon as two trials share it (2 trials x 2 threads on 2 cores ran 2-3x slower).
    import torch

    torch.set_num_threads(loop_config["threads"])

    def on_eval(point) -> None:
        result = point.as_dict()
        report({**result, Metric.OBJECTIVE: objective(result, unit, penalty, t_max),
                DEFENCE: loop_config["defence"], SAFE: point.status == "running" and point.safe})

    run_attack(cfg, on_eval=on_eval)


def _naming_group(report: Callable[[dict], None]) -> Callable[[dict], None]:
    """ray.train.report, with the worker's placement group named in its first report."""
    import ray.util

    group = ray.util.get_current_placement_group()
    first = [group.id.hex()] if group is not None else []

    def named(result: dict) -> None:
        report({**result, GROUP: first.pop()} if first else result)

    return named
