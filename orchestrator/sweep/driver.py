"""The sweep driver: runs every defence's search in one Tune run, then the runs beside the
attacks, under the sweep's lock and its SIGINT handler, and publishes the summary and report.
(The faults it survives: docs/design-notes.md, "orchestrator/sweep.py".)"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.cluster import start_ray
from orchestrator.conditions import jobs
from orchestrator.echo import say
from orchestrator.report.publish import Published, publish
from orchestrator.spec.model import DEFAULT_TRACKING_URI, SweepSpec
from orchestrator.sweep import defend, signals
from orchestrator.sweep.keys import rule_params, spec_digest, varying_fields
from orchestrator.sweep.lock import sweep_lock
from orchestrator.sweep.progress import Display
from orchestrator.sweep.resume import prepare
from orchestrator.tracking import provenance
from orchestrator.tracking.writer import Tracker
from trainables.conditioning import Conditioning
from trainables.names import Kind


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
        spec, builds = defend.build_all(spec, lambda: start_ray(address), echo)
        return _run(spec, tracking_uri, address, storage_path, echo, report_dir, builds)


def build(spec: SweepSpec, tracking_uri: str = DEFAULT_TRACKING_URI, address: str | None = None,
          echo: Callable[[str], None] = say) -> tuple[SweepSpec, list[defend.Outcome]]:
    """Build (or find in the build cache) every defence the spec builds, without attacking, and
    record each build under the sweep run `run` uses: `attack-sweep defend`. Returns the spec with
    the built folders as models, and each build."""
    with sweep_lock(spec.name, tracking_uri):
        built, outcomes = defend.build_all(spec, lambda: start_ray(address), echo)
        tracker = _tracker(built, tracking_uri, echo)
        interrupted = True
        try:
            defend.record(tracker, built, outcomes, echo)
            interrupted = False
        finally:
            tracker.close(interrupted=interrupted)
        return built, outcomes


def diagnose(spec: SweepSpec, tracking_uri: str = DEFAULT_TRACKING_URI, address: str | None = None,
             echo: Callable[[str], None] = say, conditioning: Conditioning | None = None) -> str:
    """Measure each defence's conditioning diagnostic (spec.conditioning, else `conditioning`: a
    spec without the block is still the sweep `run` records, under the same sweep run) that is
    not yet recorded, under the sweep's run and lock, without attacking; returns the MLflow
    experiment id."""
    with sweep_lock(spec.name, tracking_uri):
        spec, builds = defend.build_all(spec, lambda: start_ray(address), echo)
        measured = spec if spec.conditioning or conditioning is None else \
            spec.model_copy(update={"conditioning": conditioning})
        tracker = _tracker(spec, tracking_uri, echo)
        interrupted = True
        try:
            defend.record(tracker, spec, builds, echo)
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
         echo: Callable[[str], None], report_dir: Path | None, builds: list[defend.Outcome]) -> Swept:
    s = spec.search
    per_defence = s.num_samples if spec.adaptive else len(spec.attackers())
    display = Display([d.name for d in spec.defences], per_defence, s.unit, echo, title=spec.name)
    echo = display.echo  # in a terminal, lines print above the live display
    tracker = _tracker(spec, tracking_uri, echo)
    defend.record(tracker, spec, builds, echo)
    done = tracker.completed_keys(pruned_done=s.prune)
    cap = f", at most {s.max_compute:g} {s.unit} each" if s.max_compute else ""
    echo(f"sweep {spec.name!r}: {len(spec.defences)} defences x {per_defence} attackers "
         f"({s.algorithm} search, minimising budget-to-failure in {s.unit}{cap})")
    interrupted = True
    signals.INTERRUPTED.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signals.on_sigint) if main else None
    try:
        display.start()
        searches = [x for d in spec.defences if (x := prepare(spec, d, tracker, done, echo, display))]
        if signals.INTERRUPTED.is_set():
            raise KeyboardInterrupt
        if searches:
            from orchestrator.sweep.fit import fit  # Ray and Tune: only when there are trials to run

            fit(spec, searches, tracker, address, storage_path, echo, display)
        errored = []
        if spec.conditions or spec.conditioning or any(d.paper_attacker for d in spec.defences):
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
