"""The sweep: every defence against the adversary's attackers, as Ray Tune trials recorded
in MLflow.

    from orchestrator import spec, sweep
    swept = sweep.run(spec.load("search_spaces/quickstart.yaml"), tracking_uri="sqlite:///mlflow.db")
    swept.experiment_id, swept.published.text, swept.errored

Each defence gets its own search, and the searches run side by side in one Tune run (so every
slot stays busy): grid/random hand Tune a precomputed list of attackers (the same for every
defence); tpe/hyperopt let a model-based searcher pick each next attacker from the objective of
its own defence's trials so far (see orchestrator/adversary.py; the Tune searchers, and
SideBySide which multiplexes them, are in orchestrator/searchers.py). Each Tune trial calls the
plain `trainables.run_attack` and forwards every evaluation with `tune.report`; the driver-side
MLflow callback records what Tune sees. With search.prune the stopper ends a trial once it can
no longer lower its defence's worst case (_stopper). Ray is imported in functions here, in
searchers.py (imported by _fit only) and in the Tune callbacks of tracking.py and progress.py.

Faults it survives (tests/test_faults.py):
  - a trial's process dying (SIGKILL, the OOM killer, a lost node): Tune reruns the trial, up to
    WORKER_RETRIES times; the dead attempt's MLflow run is kept, tagged superseded and KILLED,
    and the trial is recorded once, from the attempt that finished. An exception raised by the
    trial's own code is not retried (it would only repeat): it is recorded as the trial's error,
    and `attack-sweep run` run again retries it once you have fixed its cause (so is the death of
    one of a multi-worker trial's Ray Train workers: see run_trial);
  - the tracking server going away for a while (tracking.PATIENCE_S);
  - a second `run` of the same sweep against the same tracking store on this machine: refused
    while the first holds the sweep's lock (sweep_lock);
  - the driver being killed: a local Ray it started does not outlive it (_watch_local_ray).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator import provenance
from orchestrator.adversary import Progress, cannot_lower
from orchestrator.attackers import attacker_params, label, run_name
from orchestrator.progress import Display, feed
from orchestrator.publish import Published, publish
from orchestrator.space import attacker_id, digest, encode, searched
from orchestrator.spec import DEFAULT_TRACKING_URI, Defence, SweepSpec, safe_name
from orchestrator.tracking import Tracker, callback, say
from orchestrator.trial import DEFENCE, SAFE, WORKER_RETRIES, attack_config, attacker_of, run_trial
from trainables.conditioning import Conditioning
from trainables.config import Evaluation, EvaluatorConfig
from trainables.names import BUDGET_UNITS, SUCCESS, TERMINAL, Kind, Metric, Tag

# Fields added after the first records were written: at their defaults they stay out of every
# digest, so trial keys, search keys and sweep runs recorded before them stay valid (setting
# one changes the keys of exactly the trials it changes, and those rerun).
ADDED_FIELDS: dict[tuple[str, ...], Any] = {
    ("evaluator", "label"): EvaluatorConfig.model_fields["label"].default,
    ("evaluators",): [],
    ("utility",): None,
    ("crossing",): Evaluation.model_fields["crossing"].default,
    ("confidence",): Evaluation.model_fields["confidence"].default,
    ("attacker", "attack_domain"): None,
    ("data", "attack", "domain_field"): None,
    ("data", "eval", "domain_field"): None,
    ("data", "benign", "domain_field"): None,
    ("utility", "data", "domain_field"): None,
    ("conditions",): None,
    ("space", "attack_domain"): None,
    ("defences", "*", "immunised_on"): None,
    ("defences", "*", "defender_data"): None,
    ("decide_early",): False,
    ("search", "prune"): False,
    ("g_effect",): None,
    ("conditioning",): None,
}


def stable(dump: dict[str, Any]) -> dict[str, Any]:
    """A config dump without the ADDED_FIELDS that sit at their defaults (a copy)."""
    out = json.loads(json.dumps(dump))
    for path, default in ADDED_FIELDS.items():
        for node in _parents(out, path[:-1]):
            if isinstance(node, dict) and path[-1] in node and node[path[-1]] == default:
                del node[path[-1]]
    return out


def _parents(node: Any, path: tuple[str, ...]) -> list[Any]:
    """The nodes at `path` below `node`; '*' steps into every item of a list."""
    if not path:
        return [node]
    part, rest = path[0], path[1:]
    if part == "*":
        return [x for item in (node if isinstance(node, list) else []) for x in _parents(item, rest)]
    return _parents(node.get(part), rest) if isinstance(node, dict) else []


def spec_digest(spec: SweepSpec) -> str:
    """Digest of the whole spec: the sweep's parent run in MLflow."""
    return digest(stable(spec.model_dump(mode="json")))


def trial_key(spec: SweepSpec, trial: dict[str, Any]) -> str:
    """Digest of everything that decides a trial's result: same key, same trial."""
    return digest({"defence": trial["defence"],
                   **stable(attack_config(spec, trial).model_dump(mode="json"))})


def search_key(spec: SweepSpec) -> str:
    """Digest of what decides the search itself: a rerun with more samples, a larger
    compute cap, other concurrency or other conditions (judged after the search) continues the
    same search."""
    dump = spec.model_dump(mode="json", exclude={
        "resources": True, "conditions": True, "conditioning": True,
        "search": {"num_samples", "max_compute", "max_concurrent", "prune"},
        "defences": {"__all__": {"immunised_on", "defender_data"}}})
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


def varying_fields(spec: SweepSpec) -> list[str]:
    return list(searched(spec.space))


@dataclass(frozen=True)
class Swept:
    """What a sweep that ran to its end leaves: its MLflow experiment, what publish wrote (None
    when that failed: the records are complete, `attack-sweep report` reads them) and the runs
    beside the attacks (condition and diagnostic runs) that ended in error this time."""

    experiment_id: str
    published: Published | None
    errored: list[str]


def run(spec: SweepSpec, tracking_uri: str = DEFAULT_TRACKING_URI, address: str | None = None,
        storage_path: str | None = None, echo: Callable[[str], None] = say,
        report_dir: Path | None = None) -> Swept:
    """Run the sweep's pending trials against every defence, then what it asks beside them, and
    publish its summary and report on the sweep run (the report written into `report_dir`, else
    a temporary folder). Raises SweepLocked, before touching MLflow or Ray, while another run of
    this sweep against the same tracking store holds its lock on this machine."""
    with sweep_lock(spec.name, tracking_uri):
        return _run(spec, tracking_uri, address, storage_path, echo, report_dir)


def diagnose(spec: SweepSpec, tracking_uri: str = DEFAULT_TRACKING_URI, address: str | None = None,
             echo: Callable[[str], None] = say, conditioning: Conditioning | None = None) -> str:
    """Measure each defence's conditioning diagnostic (spec.conditioning, else `conditioning`: a
    spec without the block is still the sweep `run` records, under the same sweep run) that is
    not yet recorded, under the sweep's run and lock, without attacking; returns the MLflow
    experiment id."""
    from orchestrator.conditions import jobs

    measured = spec if spec.conditioning or conditioning is None else \
        spec.model_copy(update={"conditioning": conditioning})
    with sweep_lock(spec.name, tracking_uri):
        tracker = _tracker(spec, tracking_uri, echo)
        interrupted = True
        try:
            jobs.run(measured, tracker, echo, lambda: start_ray(address), kinds=(Kind.DIAGNOSTIC,))
            interrupted = False
        finally:
            tracker.close(interrupted=interrupted)
        return tracker.experiment_id


def _tracker(spec: SweepSpec, tracking_uri: str, echo: Callable[[str], None]) -> Tracker:
    """The sweep's records: its parent run (found again by the spec's digest), spec and provenance."""
    s = spec.search
    per_defence = s.num_samples if spec.adaptive else len(spec.attackers())
    tracker = Tracker(tracking_uri, spec.name, spec_digest(spec), {
        "defences": ",".join(d.name for d in spec.defences), **rule_params(spec), "max_steps": spec.max_steps,
        "search": s.algorithm, "unit": s.unit, "num_trials": per_defence * len(spec.defences)}, echo=echo)
    try:
        tracker.record_sweep(spec.model_dump(mode="json"), provenance.gather(), s.unit, varying_fields(spec))
    except Exception as err:  # noqa: BLE001 - provenance is worth a line, not the sweep
        echo(f"note: the spec and provenance were not recorded on the sweep run ({type(err).__name__}: {err})")
    return tracker


def _run(spec: SweepSpec, tracking_uri: str, address: str | None, storage_path: str | None,
         echo: Callable[[str], None], report_dir: Path | None) -> Swept:
    s = spec.search
    per_defence = s.num_samples if spec.adaptive else len(spec.attackers())
    display = Display([d.name for d in spec.defences], per_defence, s.unit, echo, title=spec.name)
    echo = display.echo  # in a terminal, lines print above the live display
    tracker = _tracker(spec, tracking_uri, echo)
    done = tracker.completed_keys(pruned_done=s.prune)
    cap = f", at most {s.max_compute:g} {s.unit} each" if s.max_compute else ""
    echo(f"sweep {spec.name!r}: {len(spec.defences)} defences x {per_defence} attackers "
         f"({s.algorithm} search, minimising budget-to-failure in {s.unit}{cap})")
    interrupted = True
    _INTERRUPTED.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main else None
    try:
        display.start()
        searches = [x for d in spec.defences if (x := _prepare(spec, d, tracker, done, echo, display))]
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt
        if searches:
            _fit(spec, searches, tracker, address, storage_path, echo, display)
        errored = []
        if spec.conditions or spec.conditioning:
            from orchestrator.conditions import jobs

            errored = jobs.run(spec, tracker, echo, lambda: start_ray(address))
        interrupted = False
    finally:
        display.stop()
        tracker.close(interrupted=interrupted)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    # after the sweep ran to its end (a resumed one too), not after a Ctrl-C: whoever stops a sweep
    # wants their prompt back, and the next run that ends writes the summary of every record
    published = publish(tracking_uri, spec.name, tracker.parent_id, s.unit, echo=echo, out_dir=report_dir)
    return Swept(tracker.experiment_id, published, errored)


class SweepLocked(LookupError):
    """Another `run` of this sweep against the same tracking store holds its lock on this
    machine. (A LookupError, so that the CLI prints it as its one line and exits 2.)"""


@contextlib.contextmanager
def sweep_lock(name: str, tracking_uri: str):
    """Hold this machine's lock on (sweep, tracking store) for the duration, or raise SweepLocked.

    Two runs of one sweep against one store at once would start the same pending trials twice,
    and each would tag the other's live runs superseded. The second run exits at once with one
    line naming the holder, rather than waiting: a run started twice by mistake should say so,
    not sit silent for hours, and once the first ends a rerun resumes from its records anyway.
    The lock is an flock(2) on lock_dir()/<sweep>-<digest of the store>.lock: the kernel releases
    it when its process dies, however it dies, so a crashed run never leaves a stale lock. The
    file is named by the store, not the working directory, so runs started from two directories
    against one store see each other. It guards one machine only: runs on two machines sharing a
    tracking server can still duplicate trials, and the report counts such duplicates once."""
    path = lock_dir() / f"{safe_name(name)[:80]}-{_store_digest(tracking_uri)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime; not inherited by children
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise SweepLocked(
                f"another `attack-sweep run` of sweep {name!r} against {tracking_uri} is running on this "
                f"machine ({holder}); it holds {path}. Let it finish (or stop it), then rerun: recorded trials "
                "are kept") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield path
    finally:
        fh.close()  # releases the lock


def lock_dir() -> Path:
    """Where sweep locks live: the attack-sweep cache (ATTACK_SWEEP_CACHE, else ~/.cache/attack-sweep)."""
    from orchestrator.toyworld import cache_root

    return cache_root() / "locks"


def _store_digest(tracking_uri: str) -> str:
    """A digest naming the tracking store, however it was spelled: a relative sqlite or file path
    is made absolute, so two working directories share a lock only when they share a store."""
    uri = tracking_uri.strip()
    if uri.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        uri = "file:" + str(Path(path.removeprefix("//")).resolve())
    else:
        parts = urlsplit(uri.rstrip("/"))
        uri = parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


# Ctrl-C that cannot be lost: Python drops a KeyboardInterrupt raised while the main thread runs
# a finalizer (the __del__ of the many Ray handles a sweep lets go), and the sweep would then run
# to the end. The handler also sets this flag, which a Tune callback turns back into a
# KeyboardInterrupt at the next step of Tune's loop (and run() before the next defence).
_INTERRUPTED = threading.Event()


def _on_sigint(signum, frame) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt


class Interrupted(Exception):  # noqa: N818 - a Ctrl-C, not an error
    """A Ctrl-C seen by the InterruptGuard. Tune cleans up (stops its trials' actors and frees
    their resources) only when its loop fails with an Exception, so the guard raises this, and
    _fit turns it back into a KeyboardInterrupt."""


def _interrupt_guard():
    from ray.tune import Callback

    class InterruptGuard(Callback):
        """Turns the flag into Interrupted at the next step of Tune's loop (which _fit turns back
        into a KeyboardInterrupt), and keeps Tune's list of trials so that _fit can stop their
        actors after a Ctrl-C that reached it some other way."""

        trials: list = []

        def on_step_begin(self, iteration, trials, **info) -> None:
            self.trials = trials
            from orchestrator import sweep  # by reference: Tune pickles its callbacks, and an Event cannot be

            if sweep._INTERRUPTED.is_set():
                raise sweep.Interrupted  # an Exception: Tune stops its trials' actors, then re-raises

    return InterruptGuard()


@dataclass
class DefenceSearch:
    """One defence's search as the sweep resumes it: what earlier runs recorded, what is left."""

    defence: Defence
    progress: Progress
    """Trials and compute recorded so far, and the cheapest success among them."""
    configs: list[dict] | None
    """grid/random: the attackers still to run; None for an adaptive search."""
    pending: int
    priors: list[tuple[dict, float]]
    """Adaptive searches: (encoded attacker, objective) of every recorded trial."""
    adversary: str
    """The MLflow run of the adversary's progress against this defence."""
    recorded: frozenset[str] = frozenset()
    """Adaptive searches: the attacker ids of every recorded trial, never handed out again."""


def _prepare(spec: SweepSpec, defence: Defence, tracker: Tracker, done: set[str],
             echo: Callable[[str], None], display: Display | None = None) -> DefenceSearch | None:
    """One defence's search, resumed from its recorded trials (None when nothing is left)."""
    s, skey = spec.search, search_key(spec)
    prior = tracker.finished_trials(defence.name, skey)
    progress = Progress(s.unit)
    for run in prior:
        m = run.data.metrics
        progress.add(run.data.tags[Tag.STATUS], m.get(Metric.spent(s.unit), 0.0), m.get(Metric.btf(s.unit)))
    if spec.adaptive:
        configs, pending = None, max(0, s.num_samples - len(prior))
        recorded = len(prior)
    else:  # a grid trial counts as recorded by its attacker, even from a spec that since changed
        # random draws of discrete dimensions can repeat an attacker: the same trial, run once
        every = {trial_key(spec, {"defence": defence.name, **a}): a for a in spec.attackers()}
        configs = [a for key, a in every.items() if key not in done]
        pending = len(configs)
        recorded = len(every) - pending
    what = f"defence {defence.name!r}: {recorded} trials already recorded, {pending} to run"
    if display is not None:
        display.begin(defence.name, progress, recorded, pending)
    if s.max_compute and progress.compute >= s.max_compute:
        echo(f"{what}; compute cap already spent ({progress.compute:g} >= {s.max_compute:g} {s.unit})")
        if display is not None:
            display.end(defence.name)
        return None
    echo(what)
    if not pending:
        return None
    adversary = tracker.adversary_run(defence.name, skey, {
        "algorithm": s.algorithm, "unit": s.unit, "penalty": s.penalty,
        "max_compute": s.max_compute, "num_samples": s.num_samples, "n_initial": s.n_initial,
        "seed": s.seed})
    priors = [(a, r.data.metrics[Metric.OBJECTIVE]) for r in prior
              if Metric.OBJECTIVE in r.data.metrics and Tag.ATTACKER in r.data.tags
              and (a := encode(spec.space, json.loads(r.data.tags[Tag.ATTACKER]))) is not None]
    recorded_ids = frozenset(r.data.tags[Tag.ATTACKER_ID] for r in prior if Tag.ATTACKER_ID in r.data.tags)
    return DefenceSearch(defence, progress, configs, pending, priors, adversary, recorded_ids)


def _stopper(spec: SweepSpec, searches: list[DefenceSearch]):
    """The Tune stopper: a trial stops at its final status or the error it reported (the loop
    itself stops at the crossing, after refining it), and with search.prune once it can no
    longer lower its defence's worst case (its `pruned` set)."""
    from ray import tune

    field = BUDGET_UNITS[spec.search.unit]

    class Stopper(tune.Stopper):
        def __init__(self) -> None:
            self.best = {x.defence.name: x.progress.best for x in searches} if spec.search.prune else None
            self.pruned: set[str] = set()

        def __call__(self, trial_id: str, result: dict) -> bool:
            status, best = result.get("status"), self.best
            if status in (*TERMINAL, "error"):
                if best is not None and status in SUCCESS:
                    defence = result[DEFENCE]
                    best[defence] = min(best[defence], float(result[field]))
                return True
            if best is not None and cannot_lower(bool(result.get(SAFE)), float(result[field]), best[result[DEFENCE]]):
                self.pruned.add(trial_id)
                return True
            return False

        def stop_all(self) -> bool:
            return False

    return Stopper()


def _fit(spec: SweepSpec, searches: list[DefenceSearch], tracker: Tracker, address: str | None,
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
    import ray
    from ray import tune

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
        tune.with_parameters(run_trial, spec_json=spec.model_dump_json(), storage=storage),
        {"cpu": r.cpu, "gpu": r.gpu} if r.workers == 1 else {"cpu": 0.01})
    from orchestrator import searchers

    searcher = searchers.SideBySide({x.defence.name: (searchers.Capped(
        searchers.make(spec, x.configs, x.priors, x.recorded,
                       note=lambda line, d=x.defence.name: echo(f"defence {d!r}: {line}")),
        field, s.max_compute, x.progress.compute), x.pending) for x in searches})
    stopper = _stopper(spec, searches)
    guard = _interrupt_guard()
    recorded = sum(x.progress.trials for x in searches)
    pending = sum(x.pending for x in searches)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=pending,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, stop=stopper,
            failure_config=tune.FailureConfig(max_failures=WORKER_RETRIES),
            verbose=0, callbacks=[callback(tracker, describe, recorded + pending,
                                           {x.defence.name: x.progress for x in searches},
                                           {x.defence.name: x.adversary for x in searches},
                                           stopper.pruned, echo, start=recorded),
                                  *([feed(display, describe)] if display is not None else []), guard]),
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
        import gc

        gc.collect()
        raise KeyboardInterrupt


# The watchdog: a process of its own (so a SIGKILL of the driver cannot take it along) that
# waits for the driver to die, then ends what is left of the local Ray instance the driver
# started. Ray's own fate-sharing (PR_SET_PDEATHSIG) takes the raylet and GCS down with the
# driver, but not the workers or the dashboard and runtime-env agents the raylet forked: measured
# on Ray 2.60, a trial's worker outlived a SIGKILLed driver by a few seconds and the agents by
# 40-70 s; a worker stuck in a CUDA call holds its GPU as long. Every second the watchdog notes the
# Ray processes (those the driver started for Ray and all their descendants, each with its start
# time, so a reused pid is never touched); once its parent is no longer the driver it sends
# them SIGTERM, then SIGKILL to whatever is left 3 s later, and exits. It also exits, touching
# nothing, when every process it watches has ended (ray.shutdown()).
_WATCHDOG = r"""
import os, signal, sys, time
import psutil
driver, roots = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
for sig in (signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
seen = {}
def alive(pid, started):
    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while os.getppid() == driver:
    for root in roots:
        try:
            procs = [psutil.Process(root)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            try:
                seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
    seen = {pid: t for pid, t in seen.items() if alive(pid, t)}
    if not seen:
        sys.exit(0)
    time.sleep(1)
for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 0)):
    left = {pid: t for pid, t in seen.items() if alive(pid, t)}
    for pid in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while wait and time.time() < deadline and any(alive(pid, t) for pid, t in left.items()):
        time.sleep(0.1)
"""


def start_ray(address: str | None) -> None:
    """Connect to --address, or start a local Ray watched by the watchdog (once per process)."""
    import ray

    if not ray.is_initialized():
        local = address is None
        before = _children()
        ray.init(address=address, include_dashboard=False if local else None,
                 log_to_driver=False, configure_logging=True, logging_level="ERROR")
        if local:
            _watch_local_ray(before)


def _children() -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process().children()}
    except Exception:  # noqa: BLE001 - no psutil: no watchdog, nothing else changes
        return set()


def _watch_local_ray(before: set[int]) -> subprocess.Popen | None:
    """Start the watchdog over the Ray processes this driver just started (the processes Ray's
    node lists, or failing that the children that appeared during ray.init). Never called for a
    cluster given with --address, and a ray.init() that only connected (RAY_ADDRESS) started none."""
    roots: set[int] = set()
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        roots = {info.process.pid for infos in node.all_processes.values() for info in infos
                 if getattr(info, "process", None) is not None}
    except Exception:  # noqa: BLE001 - a private API: fall back to what appeared
        roots = _children() - before
    if not roots:
        return None
    try:
        return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *map(str, sorted(roots))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:
        return None


def _trials_that_fit(r) -> int:
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) // (r.cpu * r.workers + 0.01))]
    if r.gpu:
        fits.append(int(total.get("GPU", 0) // (r.gpu * r.workers)))
    return max(1, min(fits))
