"""Defences the sweep builds itself (a defence entry's `build:`): built before any attack, each in a
Ray task (on a GPU where resources ask for one), those it starts from first; found again in the
build cache when nothing they depend on changed (trainables/defences/build.py). The spec the sweep
then runs names each built folder as its defence's `model`, so trials, conditions and reports
treat it as any checkpoint. Each build is recorded in MLflow as a run of kind `build` under the
sweep run: its training budget and the terms of its objective per step."""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cluster import WORKER_RETRIES, last_line
from orchestrator.spec.model import Defence, SpecError, SweepSpec
from trainables.config import Evaluation
from trainables.names import BUILT, UNITS, Kind, Metric, Tag

PROGRESS_POLL_S = 2.0
"""How often the driver echoes the builds' progress lines while they run."""


@dataclass(frozen=True)
class Outcome:
    """One defence's build: where it is and its record (defence.json), or why it failed."""

    defence: str
    folder: Path | None
    manifest: dict[str, Any] | None
    cached: bool = False
    error: str | None = None


def order(spec: SweepSpec) -> list[list[Defence]]:
    """The defences to build, in waves: a wave's builds start from checkpoints that exist once the
    waves before it are built (the spec refuses cycles)."""
    todo = {d.name: d for d in spec.defences if d.build is not None}
    waves = []
    while todo:
        wave = [d for d in todo.values() if d.build.from_ not in todo]   # its start is ready or built
        if not wave:   # unreachable after the spec's cycle check; a guard, not a message
            raise SpecError(f"spec error: defences: {', '.join(todo)} start from each other in a cycle")
        waves.append(wave)
        for d in wave:
            del todo[d.name]
    return waves


def _build(build: dict[str, Any], start: dict[str, Any], data: dict[str, Any], folder: str | None, device: str,
           threads: int, cache: str, name: str, lines) -> dict[str, Any]:
    """One build, in a Ray worker: {"folder", "manifest", "cached"} or {"error", "traceback"}. Its
    progress lines go to the driver through `lines` (a Ray queue; worker output is not forwarded)."""
    import torch

    from trainables.config import Checkpoint, Data
    from trainables.defences.build import build as run_build
    from trainables.defences.config import Build

    torch.set_num_threads(threads)
    try:
        built = run_build(Build.model_validate(build), Checkpoint.model_validate(start), Data.model_validate(data),
                          Path(folder) if folder else None, device,
                          log=lambda line: lines.put_nowait(f"  build {name}: {line.strip()}"), cache=Path(cache))
        return {"folder": str(built.folder), "manifest": built.manifest, "cached": built.cached}
    except Exception as err:  # noqa: BLE001 - whatever it raised is this build's error, recorded
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        return {"error": last_line(text) or type(err).__name__, "traceback": text[-20_000:]}


def build_all(spec: SweepSpec, start_ray: Callable[[], None], echo: Callable[[str], None]
              ) -> tuple[SweepSpec, list[Outcome]]:
    """Build (or find) every built defence; the spec with each one's folder as its `model`. A build
    that fails raises SpecError naming it, after the others of its wave finished."""
    waves = order(spec)
    if not waves:
        return spec, []
    import ray
    from ray.util.queue import Queue

    from trainables.cache import cache_root

    start_ray()
    r = spec.resources
    cache = str(cache_root())   # the driver's: a worker started before ATTACK_SWEEP_CACHE changed builds here too
    task = ray.remote(_build).options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=WORKER_RETRIES)
    resolved = {d.name: d for d in spec.defences}
    outcomes: list[Outcome] = []
    lines = Queue(actor_options={"num_cpus": 0})   # the builds' progress (Ray does not forward worker output)
    try:
        for i, wave in enumerate(waves):
            echo(f"building {', '.join(d.name for d in wave)}" + (f" (wave {i + 1} of {len(waves)})"
                                                                 if len(waves) > 1 else "")
                 + " unless the build cache holds it ...")
            refs = {d.name: task.remote(d.build.model_dump(mode="json", by_alias=True),
                                        _start(resolved, d).model_dump(mode="json"), spec.data.model_dump(mode="json"),
                                        d.model, spec.device, max(1, int(r.cpu)), cache, d.name, lines)
                    for d in wave}
            results = _wait(refs, lines, echo)
            for d in wave:
                out = results[d.name]
                if "error" in out:
                    outcomes.append(Outcome(d.name, None, None, error=out["error"]))
                    continue
                manifest = {**out["manifest"], "from": d.build.from_}   # as this spec names it (a cache hit
                outcomes.append(Outcome(d.name, Path(out["folder"]), manifest, out["cached"]))  # may be another's)
                resolved[d.name] = d.model_copy(update={"model": out["folder"]})
                echo(line(outcomes[-1]))
            if failed := [o for o in outcomes if o.error]:
                raise SpecError(f"error: building defence {failed[0].defence} failed: {failed[0].error}")
    finally:
        lines.shutdown()
    return spec.model_copy(update={"defences": [resolved[d.name] for d in spec.defences]}), outcomes


def _wait(refs: dict[str, Any], lines, echo: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each build's result by defence, echoing the progress lines queued while they run (a task's
    lines are queued before it returns, so all of them come before its outcome)."""
    import ray

    pending, results = {ref: name for name, ref in refs.items()}, {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_POLL_S)
            for text in _drain(lines):
                echo(text)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
    except BaseException:
        for ref in refs.values():
            ray.cancel(ref, force=True)
        raise
    return results


def _drain(lines) -> list[str]:
    """The progress lines queued so far (two calls to the queue's actor, not one per line; lines
    queued between them wait for the next drain)."""
    return lines.get_nowait_batch(lines.qsize())


def _start(resolved: dict[str, Defence], d: Defence):
    """The checkpoint `d`'s build starts from: another defence's (built by now), else the path or hub
    id `from` names, loaded with `d`'s own loading settings."""
    from trainables.config import Checkpoint

    source = d.build.from_
    if source in resolved:
        return Checkpoint.model_validate(resolved[source].checkpoint())
    return Checkpoint(model=source, revision=d.revision, trust_remote_code=d.trust_remote_code, dtype=d.dtype)


def line(o: Outcome) -> str:
    """One build, for the console."""
    if o.error:
        return f"build {o.defence}: error: {o.error}"
    m = o.manifest
    b = m["budget"]
    how = "found in the build cache" if o.cached else f"built in {m['seconds']:.0f} s"
    return (f"build {o.defence}: {m['method']} ({m['finetune']}) from {m['from']}, {how}: {b['steps']} steps, "
            f"{b['examples']} examples, {b['tokens']} tokens, {b['flops']:.3g} FLOPs -> {o.folder}")


def record(tracker, spec: SweepSpec, outcomes: list[Outcome], echo: Callable[[str], None]) -> None:
    """A `build` run per built defence not yet recorded under this sweep run (keyed by its build's key):
    its training budget, its objective's terms by step, and how it answers at release (the primary's f
    and incoherent share on the held-out prompts, the utility proxy), measured here in a Ray task."""
    if not outcomes:
        return
    done = tracker.completed_keys(Kind.BUILD)
    todo = [o for o in outcomes if o.manifest is not None and o.manifest["key"] not in done]
    if not todo:
        return
    import ray  # started by build_all

    r = spec.resources
    task = ray.remote(_release).options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=WORKER_RETRIES)
    evaluation = spec.model_dump(mode="json", include=set(Evaluation.model_fields))
    refs = {o.defence: task.remote(str(o.folder), evaluation, spec.device, max(1, int(r.cpu))) for o in todo}
    for o in todo:
        m, release = o.manifest, ray.get(refs[o.defence])
        d = next(x for x in spec.defences if x.name == o.defence)
        params = {"method": m["method"], "from": m["from"], "finetune": m["finetune"], "folder": str(o.folder),
                  **{f"option.{k}": v for k, v in m["options"].items()},
                  **{k: v for k, v in m["training"].items() if k not in ("method", "from", "finetune")}}
        run_id = tracker.start_run(Kind.BUILD, m["key"], d.name, d.base, f"build · {d.name} ({m['method']})", params)
        for point in m["history"]:
            tracker.log_point(run_id, {"step": point["step"],
                                       **{Metric.build(k): v for k, v in point.items() if k != "step"}})
        b = m["budget"]
        metrics = {Metric.spent(u): float(b[u]) for u in UNITS}   # the manifest's budget, by unit
        metrics[Metric.BUILD_SECONDS] = float(m["seconds"])
        metrics.update(release.get("metrics", {}))
        why = {Tag.ERROR: f"release not measured: {release['error']}"} if "error" in release else None
        tracker.finish_run(run_id, BUILT, {k: v for k, v in metrics.items() if math.isfinite(v)}, tags=why)
        echo(f"build {d.name}: at release " + (", ".join(f"{k} {v:.3f}" for k, v in release["metrics"].items())
                                               if "metrics" in release else f"not measured: {release['error']}"))


def _release(folder: str, evaluation: dict[str, Any], device: str, threads: int) -> dict[str, Any]:
    """A built defence's figures at release, in a Ray worker (trainables/release.harmfulness)."""
    import torch

    from trainables.config import Checkpoint
    from trainables.release import harmfulness

    torch.set_num_threads(threads)
    try:
        return {"metrics": harmfulness(Checkpoint(model=folder), Evaluation.model_validate(evaluation), device)}
    except Exception as err:  # noqa: BLE001 - the build stands; its release figures are missing, said so
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return {"error": f"{type(err).__name__}: {err}"}
