"""Every defence's pending trials in one Tune run (Ray imported at the top: the driver imports
this module only when there are trials to run)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from orchestrator import capacity
from orchestrator.capacity import DRIVER_CPU, Ask
from orchestrator.cluster import WORKER_RETRIES, is_local, start_ray
from orchestrator.spec.attackers import attacker_params, label, run_name
from orchestrator.spec.model import SweepSpec
from orchestrator.spec.space import attacker_id
from orchestrator.sweep import searchers
from orchestrator.sweep.feed import ProgressFeed
from orchestrator.sweep.guard import InterruptGuard
from orchestrator.sweep.keys import rule_params, search_key, trial_key, varying_fields
from orchestrator.sweep.loop import DEFENCE, attack_config, attacker_of
from orchestrator.sweep.progress import Display
from orchestrator.sweep.recorder import MlflowRecorder
from orchestrator.sweep.resume import DefenceSearch
from orchestrator.sweep.signals import Interrupted
from orchestrator.sweep.stopper import Stopper
from orchestrator.sweep.trial import run_trial
from orchestrator.sweep.waiting import PendingWatch
from orchestrator.tracking.writer import Tracker
from trainables.names import BUDGET_UNITS, Tag


def fit(spec: SweepSpec, searches: list[DefenceSearch], tracker: Tracker, address: str | None,
        storage_path: str | None, echo: Callable[[str], None], display: Display | None = None) -> None:
    """Every defence's pending trials in one Tune run: searchers.SideBySide hands each free slot
    to the defence with the fewest trials in flight."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own Ctrl-C handler ends fit() quietly, and the sweep would go on to the
    # conditions; without it the KeyboardInterrupt reaches run(), which closes the records.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Tune's own per-trial result.json / progress.csv / TensorBoard writers: MLflow holds every
    # result already, and on 2 cores the driver's writes cost two concurrent trials about an
    # eighth of their wall time at T=400 (bench/concurrency.py). =0 brings them back.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

    s, skey = spec.search, search_key(spec)
    field = BUDGET_UNITS[s.unit]
    varying = varying_fields(spec)
    by_name = {x.defence.name: x for x in searches}

    def describe(config: dict) -> dict[str, Any]:
        defence = by_name[config[DEFENCE]].defence
        attacker = attacker_of(spec, config)
        trial = {"defence": defence.name, **attacker}
        horizon = attack_config(spec, trial).horizon
        return {"key": trial_key(spec, trial), "defence": defence.name, "is_base": defence.base,
                "attacker_id": attacker_id(attacker), "label": label(attacker, varying),
                "name": run_name(defence.name, attacker, varying),
                "params": {"defence": defence.name, **attacker_params(attacker), **rule_params(spec),
                           "max_steps": horizon, "search": s.algorithm, "unit": s.unit},
                "tags": {Tag.ATTACKER_GROUP: attacker_id({**attacker, "seed": None}),
                         Tag.ATTACKER: json.dumps(attacker, sort_keys=True)[:5000],
                         Tag.SEARCH_KEY: skey}}

    start_ray(address)
    r = spec.resources
    capacity.check_cluster(Ask.trial(r), echo)  # before any trial waits for what no node has
    storage = storage_path or str(Path.cwd() / ".attack-sweep" / "ray_results")
    if "://" not in storage:  # a local path: Tune wants it absolute; s3:// gs:// stay as given
        storage = str(Path(storage).resolve())
    # a multi-worker trial's own process only drives its TorchTrainer, whose workers hold the
    # resources; without a cap Tune would start every such trial at once
    max_concurrent = s.max_concurrent
    if r.workers > 1:
        max_concurrent = max_concurrent or _trials_that_fit(r)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec.model_dump_json(), storage=storage),
        {"cpu": r.cpu, "gpu": r.gpu} if r.workers == 1 else {"cpu": DRIVER_CPU})
    searcher = searchers.SideBySide({x.defence.name: (searchers.Capped(
        searchers.make(spec, x.configs, x.priors, x.recorded,
                       note=lambda line, d=x.defence.name: echo(f"defence {d!r}: {line}")),
        field, s.max_compute, x.progress.compute), x.pending) for x in searches})
    stopper = Stopper(spec, searches)
    guard = InterruptGuard()
    # what Tune itself waits for: a multi-worker trial's own process (its workers wait inside it)
    watch = PendingWatch(Ask.trial(r) if r.workers == 1 else Ask(DRIVER_CPU), capacity.pending_timeout(r), display,
                         local=is_local())
    recorded = sum(x.progress.trials for x in searches)
    pending = sum(x.pending for x in searches)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=pending,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, stop=stopper,
            failure_config=tune.FailureConfig(max_failures=WORKER_RETRIES),
            verbose=0, callbacks=[MlflowRecorder(tracker, describe, recorded + pending,
                                                 {x.defence.name: x.progress for x in searches},
                                                 {x.defence.name: x.adversary for x in searches},
                                                 stopper.pruned, echo, start=recorded),
                                  *([ProgressFeed(display, describe)] if display is not None else []), watch,
                                  guard]),
    )
    interrupted = False
    try:
        tuner.fit()
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    if interrupted:
        # Tune stops its trials' actors when fit() fails with an Exception, not on a Ctrl-C raised
        # in its loop: they would run on in this process's Ray, holding their CPUs and GPUs, until
        # the garbage collector freed Tune's controller (a later sweep in the same process would
        # wait on them for ever). The running trials' actors are ended here; out of the except
        # block the traceback, and with it the controller, is let go and collected.
        for trial in guard.trials:
            actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        del tuner, trainable, searcher, guard
        gc.collect()
        raise KeyboardInterrupt


def _trials_that_fit(r) -> int:
    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) // (r.cpu * r.workers + DRIVER_CPU))]
    if r.gpu:
        fits.append(int(total.get("GPU", 0) // (r.gpu * r.workers)))
    return max(1, min(fits))
