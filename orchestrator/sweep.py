"""The sweep: every defence against the adversary's attackers, as Ray Tune trials recorded
in MLflow.

    from orchestrator import spec, sweep
    sweep.run(spec.load("search_spaces/quickstart.yaml"), tracking_uri="sqlite:///mlflow.db")

Each defence gets its own search, one Tune run after another: grid/random hand Tune a
precomputed list of attackers (the same for every defence); tpe/hyperopt let a model-based
searcher pick each next attacker from the objective of the trials so far (see
orchestrator/adversary.py). Each Tune trial calls the plain `trainables.run_attack` and
forwards every evaluation with `tune.report`; the driver-side MLflow callback records
what Tune sees. Ray is imported here and in the Tune callback of tracking.py, nowhere else.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.adversary import Progress, objective
from orchestrator.space import attacker_id, decode, digest, encode, max_horizon, searched
from orchestrator.spec import Defence, SweepSpec
from orchestrator.tracking import DEFAULT_TRACKING_URI, Tracker, callback
from trainables.config import AttackConfig, Evaluation, EvaluatorConfig
from trainables.names import BUDGET_UNITS, TERMINAL


def attack_config(spec: SweepSpec, trial: dict[str, Any]) -> AttackConfig:
    """The trainable's config for one trial {defence, **attacker} of this sweep."""
    defence = next(d for d in spec.defences if d.name == trial["defence"])
    return AttackConfig(
        checkpoint=defence.model_dump(exclude={"name", "base"}),
        attacker={k: v for k, v in trial.items() if k != "defence"},
        deepspeed=spec.distributed,
        **{name: getattr(spec, name) for name in Evaluation.model_fields},
    )


# Fields added after the first records were written: at their defaults they stay out of every
# digest, so trial keys, search keys and sweep runs recorded before them stay valid (setting
# one changes the keys of exactly the trials it changes, and those rerun).
ADDED_FIELDS: dict[tuple[str, ...], Any] = {
    ("evaluator", "label"): EvaluatorConfig.model_fields["label"].default,
    ("evaluators",): [],
    ("utility",): None,
    ("crossing",): Evaluation.model_fields["crossing"].default,
    ("confidence",): Evaluation.model_fields["confidence"].default,
}


def stable(dump: dict[str, Any]) -> dict[str, Any]:
    """A config dump without the ADDED_FIELDS that sit at their defaults (a copy)."""
    out = json.loads(json.dumps(dump))
    for path, default in ADDED_FIELDS.items():
        node = out
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node and node[path[-1]] == default:
            del node[path[-1]]
    return out


def spec_digest(spec: SweepSpec) -> str:
    """Digest of the whole spec: the sweep's parent run in MLflow."""
    return digest(stable(spec.model_dump(mode="json")))


def trial_key(spec: SweepSpec, trial: dict[str, Any]) -> str:
    """Digest of everything that decides a trial's result: same key, same trial."""
    return digest({"defence": trial["defence"],
                   **stable(attack_config(spec, trial).model_dump(mode="json"))})


def search_key(spec: SweepSpec) -> str:
    """Digest of what decides the search itself: a rerun with more samples, a larger
    compute cap or other concurrency continues the same search."""
    dump = spec.model_dump(mode="json", exclude={"resources": True, "search": {
        "num_samples", "max_compute", "max_concurrent"}})
    return digest(stable(dump))[:16]


def rule_params(spec: SweepSpec) -> dict[str, Any]:
    """How trials are scored and stopped, as MLflow params (names in trainables.names.SWEEP_PARAMS)."""
    out: dict[str, Any] = {"phi": spec.phi, "eval_every": spec.eval_every, "eval_schedule": spec.eval_schedule,
                           "refine": spec.refine, "evaluator": spec.evaluator.key}
    if spec.evaluators:
        out["evaluators"] = ",".join(e.key for e in spec.all_evaluators)
    if spec.crossing != "point":
        out.update(crossing=spec.crossing, confidence=spec.confidence)
    if spec.utility:
        out.update(utility_score=spec.utility.score, utility_epsilon=spec.utility.epsilon)
    return out


def trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """grid/random: every trial, attacker-major, as {defence, **attacker}."""
    return [{"defence": d.name, **a} for a in spec.attackers() for d in spec.defences]


def label(attacker: dict[str, Any], varying: list[str]) -> str:
    """A short name for an attacker from the fields that vary in this sweep."""
    return " ".join(f"{k}={_fmt(attacker[k])}" for k in varying) or "(single attacker)"


def _fmt(v: Any) -> str:
    if isinstance(v, list) and v and isinstance(v[0], dict):  # stages
        return "+".join(s.get("name") or f"{s['data']}x{s['steps']}" for s in v)
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def varying_fields(spec: SweepSpec) -> list[str]:
    return list(searched(spec.space))


def attacker_of(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The attacker of a Tune trial config (adaptive searchers carry encoded values)."""
    return decode(spec.space, config) if spec.adaptive else \
        {k: v for k, v in config.items() if k != "defence"}


def _run_trial(config: dict[str, Any], *, spec_json: str, defence: str, storage: str) -> None:
    """The Tune function trainable: the attack loop, with every evaluation reported along
    with the searcher's objective (provisional until the final evaluation). With workers > 1
    the loop runs in each worker of a Ray Train TorchTrainer, whose rank-0 reports reach
    Tune through TuneReportCallback."""
    from ray import tune

    spec = SweepSpec.model_validate_json(spec_json)
    cfg = attack_config(spec, {"defence": defence, **attacker_of(spec, config)})
    loop_config = _loop_config(spec, cfg)
    if spec.resources.workers == 1:
        _attack_loop(loop_config, report=tune.report)
        return

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # reports reach Tune at once
    r = spec.resources
    trainer = TorchTrainer(
        _attack_loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if r.gpu > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpu > 0,
            resources_per_worker={"CPU": r.cpu, **({"GPU": r.gpu} if r.gpu else {})}),
        run_config=ray.train.RunConfig(name=f"{tune.get_context().get_trial_name()}-train",
                                       storage_path=storage, callbacks=[TuneReportCallback()]))
    trainer.fit()


def _loop_config(spec: SweepSpec, cfg) -> dict[str, Any]:
    """What one trial's loop needs, as plain data (it crosses into Ray Train workers)."""
    return {"cfg": cfg.model_dump_json(), "unit": spec.search.unit, "penalty": spec.search.penalty,
            "t_max": max_horizon(spec.space, spec.max_steps), "threads": max(1, int(spec.resources.cpu))}


def _attack_loop(loop_config: dict[str, Any], report: Callable[[dict], None] | None = None) -> None:
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
        report({**result, "objective": objective(result, unit, penalty, t_max)})

    run_attack(cfg, on_eval=on_eval)


def run(spec: SweepSpec, tracking_uri: str = DEFAULT_TRACKING_URI, address: str | None = None,
        storage_path: str | None = None, echo: Callable[[str], None] = print) -> str:
    """Run the sweep's pending trials, defence by defence; returns the MLflow experiment id."""
    s = spec.search
    per_defence = s.num_samples if spec.adaptive else len(spec.attackers())
    tracker = Tracker(tracking_uri, spec.name, spec_digest(spec), {
        "defences": ",".join(d.name for d in spec.defences), **rule_params(spec), "max_steps": spec.max_steps,
        "search": s.algorithm, "unit": s.unit, "num_trials": per_defence * len(spec.defences)})
    done = tracker.completed_keys()
    cap = f", at most {s.max_compute:g} {s.unit} each" if s.max_compute else ""
    echo(f"sweep {spec.name!r}: {len(spec.defences)} defences x {per_defence} attackers "
         f"({s.algorithm} search, minimising budget-to-failure in {s.unit}{cap})")
    interrupted = True
    _INTERRUPTED.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main else None
    try:
        for defence in spec.defences:
            if _INTERRUPTED.is_set():
                raise KeyboardInterrupt
            _search(spec, defence, tracker, done, address, storage_path, echo)
        interrupted = False
    finally:
        tracker.close(interrupted=interrupted)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return tracker.experiment_id


# Ctrl-C that cannot be lost: Python drops a KeyboardInterrupt raised while the main thread runs
# a finalizer (the __del__ of the many Ray handles a sweep lets go), and the sweep would then run
# to the end. The handler also sets this flag, which a Tune callback turns back into a
# KeyboardInterrupt at the next step of Tune's loop (and run() before the next defence).
_INTERRUPTED = threading.Event()


def _on_sigint(signum, frame) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _interrupt_guard():
    from ray.tune import Callback

    class InterruptGuard(Callback):
        def on_step_begin(self, iteration, trials, **info) -> None:
            from orchestrator import sweep  # by reference: Tune pickles its callbacks, and an Event cannot be

            if sweep._INTERRUPTED.is_set():
                raise KeyboardInterrupt

    return InterruptGuard()


def _search(spec: SweepSpec, defence: Defence, tracker: Tracker, done: set[str],
            address: str | None, storage_path: str | None, echo: Callable[[str], None]) -> None:
    """One defence's search: resume from its recorded trials, then run what is left."""
    s, skey = spec.search, search_key(spec)
    prior = tracker.finished_trials(defence.name, skey)
    progress = Progress(s.unit)
    for run in prior:
        m = run.data.metrics
        progress.add(run.data.tags["status"], m.get(f"spent_{s.unit}", 0.0),
                     m.get(f"budget_to_failure_{s.unit}"))
    if spec.adaptive:
        configs, pending = None, max(0, s.num_samples - len(prior))
        recorded = len(prior)
    else:  # a grid trial counts as recorded by its attacker, even from a spec that since changed
        every = spec.attackers()
        configs = [a for a in every if trial_key(spec, {"defence": defence.name, **a}) not in done]
        pending = len(configs)
        recorded = len(every) - pending
    what = f"defence {defence.name!r}: {recorded} trials already recorded, {pending} to run"
    if s.max_compute and progress.compute >= s.max_compute:
        echo(f"{what}; compute cap already spent ({progress.compute:g} >= {s.max_compute:g} {s.unit})")
        return
    echo(what)
    if not pending:
        return
    adversary = tracker.adversary_run(defence.name, skey, {
        "algorithm": s.algorithm, "unit": s.unit, "penalty": s.penalty,
        "max_compute": s.max_compute, "num_samples": s.num_samples, "n_initial": s.n_initial,
        "seed": s.seed})
    priors = [(a, r.data.metrics["objective"]) for r in prior
              if "objective" in r.data.metrics and "attacker" in r.data.tags
              and (a := encode(spec.space, json.loads(r.data.tags["attacker"]))) is not None]
    _fit(spec, defence, configs, pending, priors, progress, adversary, tracker, skey,
         address, storage_path, echo)


def _fit(spec: SweepSpec, defence: Defence, configs: list[dict] | None, pending: int,
         priors: list[tuple[dict, float]], progress: Progress, adversary: str, tracker: Tracker,
         skey: str, address: str | None, storage_path: str | None,
         echo: Callable[[str], None]) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own Ctrl-C handler ends fit() quietly, and the sweep would go on to the next
    # defence; without it the KeyboardInterrupt reaches run(), which closes the records.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray
    from ray import tune

    s = spec.search
    field = BUDGET_UNITS[s.unit]
    varying = varying_fields(spec)

    class PhiStopper(tune.Stopper):
        """Stop a trial at its final status (the loop itself stops at the crossing, after
        refining it)."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            return result.get("status") in TERMINAL

        def stop_all(self) -> bool:
            return False

    def describe(config: dict) -> dict[str, Any]:
        attacker = attacker_of(spec, config)
        trial = {"defence": defence.name, **attacker}
        horizon = attack_config(spec, trial).horizon
        return {"key": trial_key(spec, trial), "defence": defence.name, "is_base": defence.base,
                "attacker_id": attacker_id(attacker), "label": label(attacker, varying),
                "params": {"defence": defence.name, **attacker, **rule_params(spec), "max_steps": horizon,
                           "search": s.algorithm, "unit": s.unit},
                "tags": {"attacker_group": attacker_id({**attacker, "seed": None}),
                         "attacker": json.dumps(attacker, sort_keys=True)[:5000],
                         "search_key": skey}}

    if not ray.is_initialized():
        local = address is None
        ray.init(address=address, include_dashboard=False if local else None,
                 log_to_driver=False, configure_logging=True, logging_level="ERROR")
    storage = storage_path or str(Path.cwd() / ".attack-sweep" / "ray_results")
    if "://" not in storage:  # a local path: Tune wants it absolute; s3:// gs:// stay as given
        storage = str(Path(storage).resolve())
    r = spec.resources
    # a multi-worker trial's own process only drives its TorchTrainer, whose workers hold the
    # resources; without a cap Tune would start every such trial at once
    max_concurrent = s.max_concurrent
    if r.workers > 1:
        max_concurrent = max_concurrent or _trials_that_fit(r)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, spec_json=spec.model_dump_json(), defence=defence.name,
                             storage=storage),
        {"cpu": r.cpu, "gpu": r.gpu} if r.workers == 1 else {"cpu": 0.01})
    searcher = _capped(_searcher(spec, configs, priors), field, s.max_compute, progress.compute)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=pending,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{defence.name}", storage_path=storage, stop=PhiStopper(),
            verbose=0, callbacks=[callback(tracker, describe, progress.trials + pending,
                                           progress, adversary, echo, start=progress.trials),
                                  _interrupt_guard()]),
    )
    tuner.fit()


def _trials_that_fit(r) -> int:
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) // (r.cpu * r.workers + 0.01))]
    if r.gpu:
        fits.append(int(total.get("GPU", 0) // (r.gpu * r.workers)))
    return max(1, min(fits))


def _searcher(spec: SweepSpec, configs: list[dict] | None, priors: list[tuple[dict, float]]):
    """The adversary: a fixed list (grid/random) or a model-based searcher (tpe/hyperopt)
    over the space's searched dimensions, categorical ones as indices."""
    from ray.tune.search import Searcher

    if configs is not None:
        class FixedTrials(Searcher):
            """Hands Tune a precomputed list of attackers."""

            def __init__(self, configs: list[dict]):
                super().__init__(metric="objective", mode="min")
                self._configs = list(configs)

            def suggest(self, trial_id: str):
                return self._configs.pop(0) if self._configs else Searcher.FINISHED

            def on_trial_complete(self, trial_id, result=None, error=False) -> None:
                pass

        return FixedTrials(configs)

    s = spec.search
    space = {name: _domain(d) for name, d in searched(spec.space).items()}
    if s.algorithm == "tpe":
        import logging

        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_initial)
        return OptunaSearch(space, metric="objective", mode="min", sampler=sampler,
                            points_to_evaluate=[p for p, _ in priors] or None,
                            evaluated_rewards=[r for _, r in priors] or None)
    from ray.tune.search.hyperopt import HyperOptSearch

    # HyperOpt cannot be told past results without rerunning them: a resumed search
    # keeps its records and its count, but its model starts afresh.
    return HyperOptSearch(space, metric="objective", mode="min", n_initial_points=s.n_initial,
                          random_state_seed=s.seed)


def _domain(d):
    from ray import tune

    if d.kind in ("grid", "choice"):
        return tune.choice(list(range(len(d.values))))
    lo, hi = d.values
    if d.kind == "randint":
        return tune.randint(int(lo), int(hi))
    return (tune.loguniform if d.kind == "loguniform" else tune.uniform)(lo, hi)


def _capped(inner, field: str, cap: float | None, spent_before: float):
    """Wrap a searcher so it starts no trial once the defence's compute cap is spent
    (trials in flight finish: the cap can be overshot by up to max_concurrent trials)."""
    from ray.tune.search import Searcher

    class Capped(Searcher):
        def __init__(self) -> None:
            super().__init__(metric="objective", mode="min")
            self.spent: dict[str, float] = {}

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return inner.set_search_properties(metric, mode, config, **spec) or True

        def suggest(self, trial_id: str):
            if cap is not None and spent_before + sum(self.spent.values()) >= cap:
                return Searcher.FINISHED
            return inner.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            value = float(result.get(field) or 0.0)
            if math.isfinite(value):
                self.spent[trial_id] = max(self.spent.get(trial_id, 0.0), value)
            inner.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            inner.on_trial_complete(trial_id, result=result, error=error)

    return Capped()
