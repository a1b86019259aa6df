"""python bench/overhead.py [--smoke]

What the sweep machinery costs, and what stopping at phi saves, on the embedded toy world
(search_spaces/quickstart.yaml; the toy world is built on first use and cached). Every number
is measured in this command against a baseline measured in the same command, and printed,
never asserted: timings on a shared 2-core machine are noisy.

1. Ray + MLflow overhead, one trial. The same single trial (base defence, one attacker that
   runs late, to a late failure or to T) run
     bare:   `trainables.run_attack` in this process, torch.set_num_threads(1) so it
             matches a 1-CPU Ray trial (cold = first call here, warm = a second call);
     swept:  `attack-sweep run quickstart.yaml --set ...` as a subprocess, in a temporary
             directory with a fresh sqlite MLflow store, so it pays Python imports, Ray
             startup, MLflow setup and the report, as a user would.
   Per-step time is wall_seconds / step at the last evaluation (bare: the returned points;
   swept: the MLflow trial run's `wall_seconds` metric at its last step). Total time is the
   run_attack call, model loading included (bare), vs the whole subprocess (swept). For
   reference, the bare trial is also timed as a fresh `python -c` subprocess.
2. Compute saved by stopping at the first f > phi, for the quickstart sweep's trials: each
   trial run in process twice, as the sweep runs it (stops at the first crossing) and to T
   (phi lifted to 1.0, which f never exceeds). Steps, FLOPs and wall seconds, early / to-T.

--smoke: T=40 for part 1 and the first 4 trials (2 attackers x 2 defences) for part 2.
Ends with a markdown table to paste into a README.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from orchestrator import spec as S  # noqa: E402
from orchestrator import sweep  # noqa: E402
from trainables import AttackConfig, run_attack  # noqa: E402
from trainables.attack import AttackResult  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
NEVER_STOP_PHI = 1.0
"""f is a fraction in [0, 1] and the stop is f > phi, so phi = 1.0 never stops a trial early.
(0.999999 is not enough: the toy attacks reach f = 1.0.) AttackConfig only validates
phi < 1, so it is set with model_copy, which skips validation."""


def one_trial_overrides(max_steps: int) -> list[str]:
    """quickstart narrowed to the base defence and one attacker: SGD with momentum at the
    "usual" rate, slow enough on the base model to run late (a late failure at T=200)."""
    return [
        "defences=[{name: base, model: 'toyworld:base', base: true}]",
        "space.learning_rate=1.0e-4",
        "space.optimizer=sgd_momentum",
        "space.dataset_size=32",
        "space.finetune=full",
        "space.attack_domain=null",   # attackers of every domain, one trial
        "conditions=null",            # the attacks alone: what this bench measures
        "conditioning=null",
        "g_effect=null",
        f"max_steps={max_steps}",
    ]


# --- helpers ---------------------------------------------------------------------------


def quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore")


def timed_attack(cfg: AttackConfig) -> tuple[AttackResult, float]:
    start = time.perf_counter()
    result = run_attack(cfg)
    return result, time.perf_counter() - start


def per_step(result: AttackResult) -> float:
    last = result.points[-1]
    return last.wall_seconds / last.step if last.step else float("nan")


def attack_sweep_exe() -> list[str]:
    exe = Path(sys.executable).parent / "attack-sweep"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("attack-sweep")
    return [found] if found else [sys.executable, "-m", "orchestrator.cli"]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt_flops(x: float) -> str:
    return f"{x:.3g}"


# --- 1. one trial, bare vs through Ray + MLflow -----------------------------------------


@dataclass
class OneTrial:
    max_steps: int
    status: str
    steps: int
    cold_total: float
    warm_total: float
    warm_loop: float
    bare_step: float
    cold_step: float
    sub_bare_total: float
    sub_bare_step: float
    swept_total: float
    swept_status: str
    swept_steps: int
    swept_loop: float
    swept_step: float
    swept_summary: str


def bare_in_subprocess(overrides: list[str], workdir: Path) -> tuple[float, float]:
    """The bare trial in a fresh interpreter: imports and model loading, no Ray, no MLflow."""
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from orchestrator import spec as S, sweep
        from trainables import run_attack
        sp = S.load({str(QUICKSTART)!r}, {overrides!r})
        (trial,) = sweep.trials(sp)
        last = run_attack(sweep.attack_config(sp, trial)).points[-1]
        print("RESULT", last.step, last.wall_seconds)
    """)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"  (bare subprocess failed, rc={proc.returncode}):\n{proc.stderr[-2000:]}")
        return float("nan"), float("nan")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    _, step, loop = line.split()
    return elapsed, float(loop) / int(step)


def swept_in_subprocess(overrides: list[str], workdir: Path) -> tuple[float, str, str]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cmd = [*attack_sweep_exe(), "run", str(QUICKSTART), "--tracking-uri", uri]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900,
                          env=os.environ.copy())
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"attack-sweep run failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = next((ln.strip() for ln in proc.stdout.splitlines() if ln.startswith("[1/1]")), "?")
    return elapsed, uri, summary


def read_trial_run(uri: str, experiment: str) -> tuple[str, int, float]:
    """status, last step and wall_seconds at that step of the sweep's only trial run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")
    if len(runs) != 1:
        raise RuntimeError(f"expected 1 trial run in MLflow, found {len(runs)}")
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "wall_seconds")
    last = max(history, key=lambda m: (m.step, m.timestamp))
    return run.data.tags.get("status", "?"), int(last.step), float(last.value)


def bench_one_trial(max_steps: int) -> OneTrial:
    overrides = one_trial_overrides(max_steps)
    sp = S.load(QUICKSTART, overrides)
    (trial,) = sweep.trials(sp)
    cfg = sweep.attack_config(sp, trial)
    print(f"\n## 1. one trial: {trial['defence']} vs lr={trial['learning_rate']:g} "
          f"{trial['optimizer']} n={trial['dataset_size']} {trial['finetune']}, T={max_steps}")
    print(f"  --set {' --set '.join(repr(o) for o in overrides)}")

    cold, cold_total = timed_attack(cfg)
    warm, warm_total = timed_attack(cfg)
    last = warm.points[-1]
    print(f"  bare (in process): {warm.status} at step {last.step}; run_attack call "
          f"{cold_total:.2f} s cold (first call in this process), {warm_total:.2f} s warm (second call); "
          f"loop {cold.points[-1].wall_seconds:.2f} s cold, {last.wall_seconds:.2f} s warm = "
          f"{per_step(cold) * 1e3:.2f} / {per_step(warm) * 1e3:.2f} ms/step")

    with tempfile.TemporaryDirectory(prefix="overhead-bare-") as tmp:
        sub_bare, sub_bare_step = bare_in_subprocess(overrides, Path(tmp))
    print(f"  bare (fresh `python -c` subprocess: imports + load + loop): {sub_bare:.2f} s; "
          f"{sub_bare_step * 1e3:.2f} ms/step")

    with tempfile.TemporaryDirectory(prefix="overhead-swept-") as tmp:
        swept_total, uri, summary = swept_in_subprocess(overrides, Path(tmp))
        swept_status, swept_steps, swept_loop = read_trial_run(uri, sp.name)
    swept_step = swept_loop / swept_steps if swept_steps else float("nan")
    print(f"  swept (attack-sweep run, Ray + MLflow): {summary}")
    print(f"    whole command {swept_total:.2f} s; trial loop {swept_loop:.2f} s = "
          f"{swept_step * 1e3:.2f} ms/step (MLflow: status={swept_status}, last step {swept_steps})")
    if (swept_status, swept_steps) != (warm.status, last.step):
        print(f"  WARNING: the swept trial ended differently ({swept_status} at {swept_steps}) "
              f"from the bare one ({warm.status} at {last.step}); per-step times still compare")
    return OneTrial(max_steps=max_steps, status=warm.status, steps=last.step, cold_total=cold_total,
                    warm_total=warm_total, warm_loop=last.wall_seconds, bare_step=per_step(warm),
                    cold_step=per_step(cold), sub_bare_total=sub_bare, sub_bare_step=sub_bare_step,
                    swept_total=swept_total, swept_status=swept_status, swept_steps=swept_steps,
                    swept_loop=swept_loop, swept_step=swept_step, swept_summary=summary)


# --- 2. early stopping at phi vs running every trial to T -------------------------------


@dataclass
class Totals:
    steps: int = 0
    flops: float = 0.0
    loop: float = 0.0
    call: float = 0.0

    def add(self, result: AttackResult, call_seconds: float) -> None:
        last = result.points[-1]
        self.steps += last.step
        self.flops += last.flops
        self.loop += last.wall_seconds
        self.call += call_seconds


@dataclass
class EarlyStop:
    trials: int
    max_steps: int
    early: Totals
    to_t: Totals
    analytic_steps_to_t: int
    elapsed: float


def bench_early_stop(smoke: bool) -> EarlyStop:
    sp = S.load(QUICKSTART)
    all_trials = sweep.trials(sp)
    chosen = all_trials[:4] if smoke else all_trials
    print(f"\n## 2. stop at phi={sp.phi} vs run to T={sp.max_steps}: {len(chosen)} of "
          f"{len(all_trials)} quickstart trials, each run in process twice (measured)")
    print(f"  {'defence':<9} {'attacker':<34} {'early stop':<18} {'to T':<18} "
          f"{'steps':>9} {'FLOPs e/T':>9} {'wall e/T':>9}")
    early, to_t = Totals(), Totals()
    analytic = 0
    same_work: list[float] = []  # wall e/T of trials whose two runs do the same steps: the noise
    start = time.perf_counter()
    for trial in chosen:
        cfg = sweep.attack_config(sp, trial)
        r_early, t_early = timed_attack(cfg)
        r_full, t_full = timed_attack(cfg.model_copy(update={"phi": NEVER_STOP_PHI}))
        early.add(r_early, t_early)
        to_t.add(r_full, t_full)
        e, f = r_early.points[-1], r_full.points[-1]
        # the to-T run repeats the early run's points, then goes on (same seed, one thread)
        prefix = [(p.step, p.flops) for p in r_full.points[: len(r_early.points)]]
        if prefix != [(p.step, p.flops) for p in r_early.points]:
            print("  WARNING: the to-T run did not repeat the early-stopped run's points")
        # analytic: a trial stopped by phi would go on to T; one that diverged or was unsafe
        # at release would not (run_attack stops those whatever phi is)
        analytic += sp.max_steps if r_early.status in ("failed", "resisted") else e.step
        if e.step == f.step:
            same_work.append(ratio(e.wall_seconds, f.wall_seconds))
        who = (f"lr={trial['learning_rate']:g} {trial['optimizer']} n={trial['dataset_size']} "
               f"{trial['finetune']}")
        print(f"  {trial['defence']:<9} {who:<34} {r_early.status + ' @' + str(e.step):<18} "
              f"{r_full.status + ' @' + str(f.step):<18} {e.step:>4}/{f.step:<4} "
              f"{ratio(e.flops, f.flops):>9.2f} {ratio(e.wall_seconds, f.wall_seconds):>9.2f}")
    elapsed = time.perf_counter() - start
    print(f"  totals: steps {early.steps} / {to_t.steps} (analytic to-T: {analytic} = trials x T, "
          f"less trials that stop anyway); FLOPs {fmt_flops(early.flops)} / {fmt_flops(to_t.flops)}; "
          f"loop {early.loop:.1f} s / {to_t.loop:.1f} s; run_attack calls {early.call:.1f} s / "
          f"{to_t.call:.1f} s; part 2 took {elapsed:.0f} s")
    if same_work:
        print(f"  noise: the {len(same_work)} trials whose two runs do identical work show wall e/T "
              f"{min(same_work):.2f}..{max(same_work):.2f} (1.00 if timing were exact)")
    return EarlyStop(len(chosen), sp.max_steps, early, to_t, analytic, elapsed)


# --- report ------------------------------------------------------------------------------


def table(one: OneTrial, stop: EarlyStop) -> str:
    n = f"{stop.trials} trials"
    rows = [
        ("measure", "baseline", "measured", "ratio"),
        (f"per-step time, 1 trial ({one.steps} steps)", f"bare, warm {one.bare_step * 1e3:.2f} ms",
         f"Ray+MLflow {one.swept_step * 1e3:.2f} ms", f"{ratio(one.swept_step, one.bare_step):.2f}"),
        (f"per-step time, 1 trial ({one.steps} steps)", f"bare, cold {one.cold_step * 1e3:.2f} ms",
         f"Ray+MLflow {one.swept_step * 1e3:.2f} ms", f"{ratio(one.swept_step, one.cold_step):.2f}"),
        (f"per-step time, 1 trial ({one.steps} steps)", f"bare `python -c` {one.sub_bare_step * 1e3:.2f} ms",
         f"Ray+MLflow {one.swept_step * 1e3:.2f} ms", f"{ratio(one.swept_step, one.sub_bare_step):.2f}"),
        ("total wall time, 1 trial", f"bare run_attack, warm {one.warm_total:.2f} s",
         f"`attack-sweep run` {one.swept_total:.1f} s", f"{ratio(one.swept_total, one.warm_total):.1f}"),
        ("total wall time, 1 trial", f"bare run_attack, cold {one.cold_total:.2f} s",
         f"`attack-sweep run` {one.swept_total:.1f} s", f"{ratio(one.swept_total, one.cold_total):.1f}"),
        ("total wall time, 1 trial", f"bare `python -c` {one.sub_bare_total:.2f} s",
         f"`attack-sweep run` {one.swept_total:.1f} s", f"{ratio(one.swept_total, one.sub_bare_total):.1f}"),
        (f"steps, {n}", f"to T {stop.to_t.steps}", f"stop at phi {stop.early.steps}",
         f"{ratio(stop.early.steps, stop.to_t.steps):.2f}"),
        (f"FLOPs, {n}", f"to T {fmt_flops(stop.to_t.flops)}", f"stop at phi {fmt_flops(stop.early.flops)}",
         f"{ratio(stop.early.flops, stop.to_t.flops):.2f}"),
        (f"wall time (attack loops), {n}", f"to T {stop.to_t.loop:.1f} s", f"stop at phi {stop.early.loop:.1f} s",
         f"{ratio(stop.early.loop, stop.to_t.loop):.2f}"),
        (f"wall time (run_attack calls), {n}", f"to T {stop.to_t.call:.1f} s",
         f"stop at phi {stop.early.call:.1f} s", f"{ratio(stop.early.call, stop.to_t.call):.2f}"),
    ]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---|---|---:|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--smoke", action="store_true", help="T=40 for part 1, 4 trials for part 2")
    args = ap.parse_args(argv)

    quiet_libraries()
    torch.set_num_threads(1)
    import mlflow
    import ray

    print(f"# attack-sweep overhead{' (smoke)' if args.smoke else ''}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")
    print(f"in-process baseline: torch.set_num_threads({torch.get_num_threads()}), to match a "
          f"1-CPU Ray trial (resources: cpu 1); device: {S.load(QUICKSTART).device} "
          f"({'cuda' if torch.cuda.is_available() else 'cpu'} here)")
    if hasattr(os, "getloadavg"):
        print("load average at start (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    started = time.perf_counter()
    one = bench_one_trial(40 if args.smoke else 200)
    stop = bench_early_stop(args.smoke)

    print(f"\n## summary ({'smoke, ' if args.smoke else ''}{time.perf_counter() - started:.0f} s in all)")
    print(f"ratios are measured / baseline; part 1 ran the trial to step {one.steps} ({one.status}) of "
          f"T={one.max_steps}; part 2 measured (each trial run to T too, phi lifted to "
          f"{NEVER_STOP_PHI}), not extrapolated. Baseline in-process runs use 1 torch thread.\n")
    print(table(one, stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
