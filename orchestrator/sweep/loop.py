"""One trial's attack as plain data and a plain function: its AttackConfig from the spec, the loop
config that crosses into Ray Train workers, and the loop that reports each evaluation with the
searcher's objective. No Ray or MLflow at module level: a trial's process loads it to unpickle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.spec.model import SweepSpec
from orchestrator.spec.space import decode, max_horizon
from orchestrator.sweep.adversary import objective
from trainables.config import AttackConfig, Evaluation
from trainables.names import Metric


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
