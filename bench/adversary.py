"""python bench/adversary.py [--seeds 3] [--trials 16] [--smoke] [--world toy|smollm2] [--arms grid,tpe,...]
                           [--max-steps T]

How much attacker compute each adversary spends before it finds a defence's worst case, and in
all, on the demo's toy world (base and rescaled) or, with --world smollm2, the SmolLM2 example
(aligned and deep; its checkpoints must be built: `make smollm2` builds them). Four adversaries
search the same attacker space, each with the same budget of trials per defence:

    grid         toy: learning rate {1e-4, 3e-4, 1e-3, 3e-3} x optimizer {adamw, sgd_momentum}
                 x finetune {full, lora}: 16 attackers, listed from the usual learning rate up;
                 smollm2: the example's 8 attackers (lr {1e-4, 1e-3} x LoRA/full x domain)
    random       the same ranges sampled (learning rate log-uniform), seeds 0..S-1
    tpe          the same space searched by Optuna TPE (3 random trials first), seeds 0..S-1
    tpe+prune    tpe with search.prune: a trial stops once the budget it has spent, still safe,
                 reaches the cheapest success found so far against its defence

The target for a defence is the cheapest successful attack any run of this command found
(in steps). For every run we record the attacker compute (steps, summed over finished trials in
completion order) spent up to and including the trial that reached the target ("until found";
a run that never reached it is "not found", with its total), and the compute of the whole
search ("total"). Ratios are against the grid, measured in the same command, and tpe+prune's
total against tpe's. Trials run one at a time (max_concurrent 1) so completion order is the
searchers' order. Pruning cannot cut the compute spent before a defence's first success: a
search whose first success is its worst case gains nothing until found, only in total.
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


SMOLLM2 = ROOT / "examples" / "smollm2" / "sweep.yaml"


def spaces(trials: int, world: str) -> dict[str, tuple[dict, dict]]:
    if world == "smollm2":
        lrs = [1e-4, 1e-3]
        grid = {"learning_rate": {"grid": lrs}, "finetune": {"grid": ["lora", "full"]},
                "attack_domain": {"grid": ["fraud", "cyber"]}}
        sampled = {"learning_rate": {"loguniform": lrs}, "finetune": {"choice": ["lora", "full"]},
                   "attack_domain": {"choice": ["fraud", "cyber"]}}
    else:
        grid = {"learning_rate": {"grid": LRS}, "optimizer": {"grid": ["adamw", "sgd_momentum"]},
                "finetune": {"grid": ["full", "lora"]}, "dataset_size": 32}
        sampled = {"learning_rate": {"loguniform": [LRS[0], LRS[-1]]},
                   "optimizer": {"choice": ["adamw", "sgd_momentum"]},
                   "finetune": {"choice": ["full", "lora"]}, "dataset_size": 32}
    tpe = {"algorithm": "tpe", "num_samples": trials, "n_initial": 3}
    return {"grid": ({"algorithm": "grid"}, grid),
            "random": ({"algorithm": "random", "num_samples": trials}, sampled),
            "tpe": (tpe, sampled),
            "tpe+prune": ({**tpe, "prune": True}, sampled)}


def run_one(algorithm: str, seed: int, trials: int, uri: str, storage: str, world: str,
            max_steps: int | None) -> str:
    search, space = spaces(trials, world)[algorithm]
    name = f"bench-{algorithm.replace('+', '-')}-{seed}"
    sets = [f"name={name}", f"search={search | {'seed': seed, 'max_concurrent': 1}}",
            "conditions=null", "conditioning=null", "g_effect=null",   # the attacks alone
            *([f"max_steps={max_steps}"] if max_steps else [])]
    if world == "smollm2":  # the example's space, its searched dimensions as `space` says
        spec = S.load(SMOLLM2, [*sets, *(f"space.{k}={v}" for k, v in space.items())])
    else:
        spec = S.load(QUICKSTART, [*sets, f"space={space}"])   # the search alone
    sweep.run(spec, tracking_uri=uri, storage_path=storage, echo=lambda s: None)
    return name


def trajectory(uri: str, experiment: str) -> dict[str, list[tuple[float, float]]]:
    """Per defence, in trial order: (steps spent by this trial, its budget-to-failure or inf)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}'", max_results=10_000)
    if errors := [r for r in runs if r.data.tags.get(Tag.STATUS) == "error"]:
        raise SystemExit(f"{experiment}: {len(errors)} trial(s) ended in error, e.g. "
                         f"{errors[0].data.tags.get(Tag.ERROR, '?')}: the figures would be wrong")
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
    ap.add_argument("--world", choices=["toy", "smollm2"], default="toy")
    ap.add_argument("--arms", default="grid,random,tpe,tpe+prune", help="adversaries to run (grid always runs)")
    ap.add_argument("--max-steps", type=int, default=None, help="T of every attacker (default: the spec's)")
    args = ap.parse_args(argv)
    arms = ["grid", *(a for a in ("random", "tpe", "tpe+prune") if a in args.arms.split(","))]
    seeds, trials = (1, 6) if args.smoke else (args.seeds, args.trials)
    if args.world == "smollm2":
        os.environ.setdefault("SMOLLM2_WORLD", str(Path.home() / ".cache" / "attack-sweep" / "smollm2-v3"))

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    work = Path(tempfile.mkdtemp(prefix="bench-adversary-"))
    uri, storage = f"sqlite:///{work}/mlflow.db", str(work / "ray")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    start = time.perf_counter()
    for algorithm in runs:
        for seed in ([0] if algorithm == "grid" else range(seeds)):
            t0 = time.perf_counter()
            runs[algorithm].append(trajectory(uri, run_one(algorithm, seed, trials, uri, storage, args.world,
                                                           args.max_steps)))
            print(f"{algorithm} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    defences = sorted(runs["grid"][0])
    targets = {d: min(b for rs in runs.values() for r in rs for _, b in r[d]) for d in defences}

    print(f"\n{args.world} world: attacker compute (steps) spent until the defence's worst case was found, "
          f"and in all; {trials} trials per random/tpe search ({time.perf_counter() - start:.0f} s in all)\n")
    print("| defence | worst case (steps) | adversary | until found | found in | ratio to grid | "
          "total | total ratio to grid |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for d in defences:
        grid_spent, _ = spent_until(runs["grid"][0][d], targets[d])
        grid_total = sum(x for x, _ in runs["grid"][0][d])
        for algorithm, rs in runs.items():
            results = [spent_until(r[d], targets[d]) for r in rs]
            spent = statistics.median(s for s, _ in results)
            total = statistics.median(sum(x for x, _ in r[d]) for r in rs)
            medians[d, algorithm] = spent, total
            found = sum(f for _, f in results)
            many = " (median)" if len(rs) > 1 else ""
            print(f"| {d} | {targets[d]:g} | {algorithm} | {spent:g}{many} | {found}/{len(rs)} | "
                  f"{spent / grid_spent:.2f} | {total:g}{many} | {total / grid_total:.2f} |")
    print("\ntargets (toy world): tpe+prune total <= 0.6x tpe's at the same worst case; tpe+prune until found "
          "<= 0.1x the grid's where pruning can reach it\n")
    print("| defence | tpe+prune total / tpe total | tpe+prune until found / grid |")
    print("|---|---:|---:|")
    for d in defences if {"tpe", "tpe+prune"} <= set(arms) else []:
        (_, tpe_total), (p_spent, p_total) = medians[d, "tpe"], medians[d, "tpe+prune"]
        grid_spent = medians[d, "grid"][0]
        print(f"| {d} | {p_total / tpe_total:.2f} ({'met' if p_total / tpe_total <= 0.6 else 'not met'}) | "
              f"{p_spent / grid_spent:.2f} ({'met' if p_spent / grid_spent <= 0.1 else 'not met'}) |")
    print(f"\nrecords: {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
