"""The sweep: every defence against every attacker, as Ray Tune trials recorded in MLflow.

    from orchestrator import spec, sweep
    sweep.run(spec.load("search_spaces/quickstart.yaml"), tracking_uri="sqlite:///mlflow.db")

Ray is imported here and nowhere else. Each Tune trial calls the plain
`trainables.run_attack` and forwards every evaluation with `tune.report`; a stopper ends
a trial once f > phi; the driver-side MLflow callback records what Tune sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.space import attacker_id, digest
from orchestrator.spec import SweepSpec
from orchestrator.tracking import DEFAULT_TRACKING_URI, Tracker, callback
from trainables.budget import TERMINAL
from trainables.config import AttackConfig


def attack_config(spec: SweepSpec, trial: dict[str, Any]) -> AttackConfig:
    """The trainable's config for one trial {defence, **attacker} of this sweep."""
    defence = next(d for d in spec.defences if d.name == trial["defence"])
    return AttackConfig(
        checkpoint=defence.model_dump(exclude={"name", "base"}),
        data=spec.data, evaluator=spec.evaluator,
        attacker={k: v for k, v in trial.items() if k != "defence"},
        phi=spec.phi, eval_every=spec.eval_every, max_steps=spec.max_steps, device=spec.device,
    )


def trial_key(spec: SweepSpec, trial: dict[str, Any]) -> str:
    """Digest of everything that decides a trial's result: same key, same trial."""
    return digest({"defence": trial["defence"],
                   **attack_config(spec, trial).model_dump(mode="json")})


def trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Attacker-major order, so every defence has faced the first attackers early."""
    return [{"defence": d.name, **a} for a in spec.attackers() for d in spec.defences]


def label(attacker: dict[str, Any], varying: list[str]) -> str:
    """A short name for an attacker from the fields that vary in this sweep."""
    return " ".join(f"{k}={_fmt(attacker[k])}" for k in varying) or "(single attacker)"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def varying_fields(spec: SweepSpec) -> list[str]:
    return [k for k, d in dict(spec.space).items() if d.kind != "constant"]


def _run_trial(config: dict[str, Any], *, spec_json: str) -> None:
    """The Tune function trainable: the attack loop, with every evaluation reported."""
    from ray import tune

    from trainables import run_attack

    spec = SweepSpec.model_validate_json(spec_json)
    run_attack(attack_config(spec, config), on_eval=lambda p: tune.report(p.as_dict()))


def run(spec: SweepSpec, tracking_uri: str = DEFAULT_TRACKING_URI, address: str | None = None,
        storage_path: str | None = None, echo: Callable[[str], None] = print) -> str:
    """Run the sweep's pending trials; returns the MLflow experiment id."""
    all_trials = trials(spec)
    tracker = Tracker(tracking_uri, spec.name, digest(spec.model_dump(mode="json")), {
        "defences": ",".join(d.name for d in spec.defences), "phi": spec.phi,
        "eval_every": spec.eval_every, "max_steps": spec.max_steps,
        "evaluator": spec.evaluator.name, "search": spec.search.algorithm,
        "num_trials": len(all_trials)})
    done = tracker.completed_keys()
    pending = [t for t in all_trials if trial_key(spec, t) not in done]
    echo(f"sweep {spec.name!r}: {len(all_trials)} trials ({len(spec.defences)} defences x "
         f"{len(all_trials) // len(spec.defences)} attackers); {len(all_trials) - len(pending)} "
         f"already recorded in MLflow, {len(pending)} to run")
    interrupted = True
    try:
        if pending:
            _fit(spec, pending, tracker, address, storage_path, echo)
        interrupted = False
    finally:
        tracker.close(interrupted=interrupted)
    return tracker.experiment_id


def _fit(spec: SweepSpec, pending: list[dict], tracker: Tracker, address: str | None,
         storage_path: str | None, echo: Callable[[str], None]) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune
    from ray.tune.search import Searcher

    class FixedTrials(Searcher):
        """Hands Tune a precomputed list of trials (grid/random sweeps)."""

        def __init__(self, configs: list[dict]):
            super().__init__()
            self._configs = list(configs)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            return self._configs.pop(0) if self._configs else Searcher.FINISHED

        def on_trial_complete(self, trial_id, result=None, error=False) -> None:
            pass

    class PhiStopper(tune.Stopper):
        """Stop a trial at its first evaluation with f > phi, or at its final status."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            return result.get("status") in TERMINAL or result.get("harmfulness", 0) > spec.phi

        def stop_all(self) -> bool:
            return False

    varying = varying_fields(spec)
    base = spec.base.name

    def describe(config: dict) -> dict[str, Any]:
        attacker = {k: v for k, v in config.items() if k != "defence"}
        return {"key": trial_key(spec, config), "defence": config["defence"],
                "is_base": config["defence"] == base, "attacker_id": attacker_id(attacker),
                "label": label(attacker, varying),
                "params": {"defence": config["defence"], **attacker, "phi": spec.phi,
                           "eval_every": spec.eval_every, "max_steps": spec.max_steps,
                           "evaluator": spec.evaluator.name}}

    if not ray.is_initialized():
        local = address is None
        ray.init(address=address, include_dashboard=False if local else None,
                 log_to_driver=False, configure_logging=True, logging_level="ERROR")
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, spec_json=spec.model_dump_json()),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    storage = storage_path or str(Path.cwd() / ".attack-sweep" / "ray_results")
    if "://" not in storage:  # a local path: Tune wants it absolute; s3:// gs:// stay as given
        storage = str(Path(storage).resolve())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=FixedTrials(pending), num_samples=len(pending),
                                    max_concurrent_trials=spec.search.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, stop=PhiStopper(), verbose=0,
            callbacks=[callback(tracker, describe, len(pending), echo)]),
    )
    tuner.fit()
