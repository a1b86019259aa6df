"""python bench/adversary.py [--seeds 3] [--trials 16] [--smoke]

How much attacker compute each adversary spends before it finds a defence's worst case,
on the demo's toy world (base and rescaled). Three adversaries search the same attacker
space, each with the same budget of trials per defence:

    grid      learning rate {1e-4, 3e-4, 1e-3, 3e-3} x optimizer {adamw, sgd_momentum}
              x finetune {full, lora}: 16 attackers, listed from the usual learning rate up
    random    learning rate log-uniform [1e-4, 3e-3], the same choices, seeds 0..S-1
    tpe       the same space searched by Optuna TPE (3 random trials first), seeds 0..S-1

The target for a defence is the cheapest successful attack any run of this command found
(in steps, within the eval interval of 5). For every run we record the attacker compute
(steps, summed over finished trials in completion order) spent up to and including the
trial that reached the target; a run that never reached it is reported as "not found"
with its total spent. Ratios are against the grid, measured in the same command. Trials
run one at a time (max_concurrent 1) so completion order is the searchers' order.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator import spec as S  # noqa: E402
from orchestrator import sweep  # noqa: E402
from trainables.names import Kind, Metric, Tag  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def spaces(trials: int) -> dict[str, tuple[dict, dict]]:
    grid = {"learning_rate": {"grid": LRS}, "optimizer": {"grid": ["adamw", "sgd_momentum"]},
            "finetune": {"grid": ["full", "lora"]}, "dataset_size": 32}
    sampled = {"learning_rate": {"loguniform": [LRS[0], LRS[-1]]},
               "optimizer": {"choice": ["adamw", "sgd_momentum"]},
               "finetune": {"choice": ["full", "lora"]}, "dataset_size": 32}
    return {"grid": ({"algorithm": "grid"}, grid),
            "random": ({"algorithm": "random", "num_samples": trials}, sampled),
            "tpe": ({"algorithm": "tpe", "num_samples": trials, "n_initial": 3}, sampled)}


def run_one(algorithm: str, seed: int, trials: int, uri: str, storage: str) -> str:
    search, space = spaces(trials)[algorithm]
    name = f"bench-{algorithm}-{seed}"
    spec = S.load(QUICKSTART, [f"name={name}", f"search={search | {'seed': seed, 'max_concurrent': 1}}",
                               f"space={space}", "conditions=null"])   # the search alone
    sweep.run(spec, tracking_uri=uri, storage_path=storage, echo=lambda s: None)
    return name


def trajectory(uri: str, experiment: str) -> dict[str, list[tuple[float, float]]]:
    """Per defence, in trial order: (steps spent by this trial, its budget-to-failure or inf)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}'", max_results=10_000)
    out: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: int(r.data.tags.get(Tag.TRIAL_NUMBER, 0))):
        m = r.data.metrics
        out.setdefault(r.data.tags[Tag.DEFENCE], []).append(
            (m.get(Metric.spent("steps"), 0.0), m.get(Metric.btf("steps"), math.inf)))
    return out


def spent_until(traj: list[tuple[float, float]], target: float) -> tuple[float, bool]:
    total = 0.0
    for spent, btf in traj:
        total += spent
        if btf <= target:
            return total, True
    return total, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--seeds", type=int, default=3, help="seeds of random and tpe (default 3)")
    ap.add_argument("--trials", type=int, default=16, help="trials per defence for random/tpe")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 6 trials")
    args = ap.parse_args(argv)
    seeds, trials = (1, 6) if args.smoke else (args.seeds, args.trials)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    work = Path(tempfile.mkdtemp(prefix="bench-adversary-"))
    uri, storage = f"sqlite:///{work}/mlflow.db", str(work / "ray")
    runs: dict[str, list[dict]] = {"grid": [], "random": [], "tpe": []}
    start = time.perf_counter()
    for algorithm in runs:
        for seed in ([0] if algorithm == "grid" else range(seeds)):
            t0 = time.perf_counter()
            runs[algorithm].append(trajectory(uri, run_one(algorithm, seed, trials, uri, storage)))
            print(f"{algorithm} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    defences = sorted(runs["grid"][0])
    targets = {d: min(b for rs in runs.values() for r in rs for _, b in r[d]) for d in defences}

    print(f"\nattacker compute (steps) spent until the defence's worst case was found; "
          f"{trials} trials per search ({time.perf_counter() - start:.0f} s in all)\n")
    print("| defence | worst case (steps) | adversary | steps spent until found | found in | ratio to grid |")
    print("|---|---:|---|---:|---:|---:|")
    for d in defences:
        grid_spent, _ = spent_until(runs["grid"][0][d], targets[d])
        for algorithm, rs in runs.items():
            results = [spent_until(r[d], targets[d]) for r in rs]
            spent = statistics.median(s for s, _ in results)
            found = sum(f for _, f in results)
            print(f"| {d} | {targets[d]:g} | {algorithm} | {spent:g}"
                  f"{' (median)' if len(rs) > 1 else ''} | {found}/{len(rs)} | {spent / grid_spent:.2f} |")
    print(f"\nrecords: {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
