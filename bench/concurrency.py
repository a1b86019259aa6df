"""python bench/concurrency.py [--attackers 4] [--repeats 1]

Do concurrent trials fill the cluster? The same quickstart trials (base and rescaled against
the first N attackers, every trial run to T=200 with phi lifted to 1 so each does the same work)
run on a 2-CPU local Ray, 1 CPU per trial, twice in this command: one trial at a time
(search.max_concurrent 1) and two at a time (max_concurrent 2). Each arm gets a fresh MLflow
store and experiment. Reported: wall time of the sweep (Ray already up) and of the trials'
attack loops, and the ratio. Torch runs one thread per trial (a 1-CPU trial), so two
concurrent trials should take about half the time if nothing else is shared.
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
                               "space.finetune=full", "space.attack_domain=null", "conditions=null",
                               f"search={{algorithm: grid, max_concurrent: {concurrent}}}",
                               f"space.learning_rate={{grid: {[1e-4, 3e-4, 1e-3, 3e-3][:attackers]}}}"])
    start = time.perf_counter()
    sweep.run(spec, tracking_uri=f"sqlite:///{work}/{tag}.db", storage_path=str(work / "ray"),
              echo=lambda s: None)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--attackers", type=int, default=4, choices=range(1, 5))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="T: each trial runs this many steps (default 200)")
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    arm(1, 1, 5, work, "warmup")  # toy world, imports, first actor: paid before either arm
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for c in (1, 2):
            times[c].append(arm(c, args.attackers, args.steps, work, f"c{c}-r{r}"))
            print(f"max_concurrent {c}, repeat {r}: {times[c][-1]:.1f} s", flush=True)
    one, two = min(times[1]), min(times[2])
    n = 2 * args.attackers
    print(f"\n{n} trials (2 defences x {args.attackers} attackers, each to T={args.steps}), 2-CPU local Ray, "
          f"1 CPU per trial; best of {args.repeats}\n")
    print("| arm | sweep wall time | ratio |")
    print("|---|---:|---:|")
    print(f"| one at a time (max_concurrent 1) | {one:.1f} s | 1.00 |")
    print(f"| two at a time (max_concurrent 2) | {two:.1f} s | {two / one:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
