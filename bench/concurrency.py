"""python bench/concurrency.py [--attackers 4] [--repeats 1] [--steps 40,400]

Do concurrent trials fill the cluster? The same quickstart trials (base and rescaled against
the first N attackers, every trial run to T with phi lifted to 1 so each does the same work)
run on a 2-CPU local Ray, 1 CPU per trial, twice per T in this command: one trial at a time
(search.max_concurrent 1) and two at a time (max_concurrent 2). The defences' searches run side
by side in one Tune run (searchers.SideBySide), so the second slot never idles at a defence's
tail. Each arm gets a fresh MLflow store and experiment. Reported: wall time of the sweep (Ray
already up) and the ratio, with the issue's targets beside them (<= 0.55x at T=400, <= 0.7x
at T=40). Torch runs one thread per trial (a 1-CPU trial), so two concurrent trials should take
about half the time if nothing else is shared; on 2 cores the driver (Tune's loop, the MLflow
writes) shares the cores with the trials, which is what short trials feel most.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from orchestrator import spec as S  # noqa: E402
from orchestrator import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def arm(concurrent: int, attackers: int, steps: int, work: Path, tag: str) -> float:
    spec = S.load(QUICKSTART, [f"name=concurrency-{tag}", "phi=1", "space.dataset_size=32", f"max_steps={steps}",
                               "space.finetune=full", "space.attack_domain=null",
                               "conditions=null", "conditioning=null", "g_effect=null",   # the attacks alone
                               f"search={{algorithm: grid, max_concurrent: {concurrent}}}",
                               f"space.learning_rate={{grid: {[1e-4, 3e-4, 1e-3, 3e-3][:attackers]}}}"])
    start = time.perf_counter()
    sweep.run(spec, tracking_uri=f"sqlite:///{work}/{tag}.db", storage_path=str(work / "ray"),
              echo=lambda s: None)
    return time.perf_counter() - start


TARGETS = {40: 0.7, 400: 0.55}
"""The issue's targets: two at a time over one at a time, by T."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--attackers", type=int, default=4, choices=range(1, 5))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", default="40,400", help="T values, comma-separated: each trial runs T steps")
    args = ap.parse_args(argv)
    horizons = [int(x) for x in args.steps.split(",")]

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    arm(1, 1, 5, work, "warmup")  # toy world, imports, first actor: paid before either arm
    times: dict[tuple[int, int], list[float]] = {}
    for steps in horizons:
        for r in range(args.repeats):
            for c in (1, 2):
                times.setdefault((steps, c), []).append(arm(c, args.attackers, steps, work, f"t{steps}-c{c}-r{r}"))
                print(f"T={steps}, max_concurrent {c}, repeat {r}: {times[steps, c][-1]:.1f} s", flush=True)
    n = 2 * args.attackers
    print(f"\n{n} trials (2 defences x {args.attackers} attackers, each to T), 2-CPU local Ray, 1 CPU per "
          f"trial, defences side by side; best of {args.repeats}\n")
    print("| T | one at a time | two at a time | ratio | target |")
    print("|---:|---:|---:|---:|---|")
    for steps in horizons:
        one, two = min(times[steps, 1]), min(times[steps, 2])
        target = TARGETS.get(steps)
        verdict = "" if target is None else f"<= {target:.2f}x: {'met' if two / one <= target else 'not met'}"
        print(f"| {steps} | {one:.1f} s | {two:.1f} s | {two / one:.2f} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
