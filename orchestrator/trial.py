"""One trial, as Tune runs it in its own process: the function trainable and the attack loop it
drives. Imports no MLflow and no Ray at module level (a trial's process loads this module to
unpickle the trainable): spec, space, the objective and trainables only."""

from __future__ import annotations

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


WORKER_RETRIES = 2
"""How many times Tune reruns a trial whose process died (tune.FailureConfig.max_failures). Only
the death of the trial's own process reaches Tune as a failure: run_trial reports whatever the
attack raises as the trial's error, so this retries the crashes a rerun can survive (SIGKILL, the
OOM killer, a lost node), never a bug or bad data, which would only fail again."""


def run_trial(config: dict[str, Any], *, spec_json: str, storage: str) -> None:
    """The Tune function trainable. An exception from the attack ends the trial with a final
    result {status: error, error: its last line, traceback}, which Tune does not retry.

    With workers > 1 the death of a Ray Train worker also arrives here, as an exception from
    trainer.fit(), and is recorded as the trial's error, not retried: on Ray 2.60 the dead worker
    group's placement group is not released (measured: a 2-worker CPU trial whose worker was
    SIGKILLed left its 2 x 0.5 CPU bundle CREATED), so a rerun, like any later multi-worker trial
    on those resources, would wait for it for ever."""
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
    a Ray Train TorchTrainer, whose rank-0 reports reach Tune through TuneReportCallback."""
    from ray import tune

    spec = SweepSpec.model_validate_json(spec_json)
    cfg = attack_config(spec, {"defence": config[DEFENCE], **attacker_of(spec, config)})
    loop = loop_config(spec, cfg, config[DEFENCE])
    if spec.resources.workers == 1:
        attack_loop(loop, report=tune.report)
        return

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # reports reach Tune at once
    r = spec.resources
    trainer = TorchTrainer(
        attack_loop, train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if r.gpu > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpu > 0,
            resources_per_worker={"CPU": r.cpu, **({"GPU": r.gpu} if r.gpu else {})}),
        run_config=ray.train.RunConfig(name=f"{tune.get_context().get_trial_name()}-train",
                                       storage_path=storage, callbacks=[TuneReportCallback()]))
    trainer.fit()


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

        report = ray.train.report
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

