"""python bench/eval_share.py [--steps 30] [--defence deep] [--batch-size 10] [--threads 1]

The evaluation share of one SmolLM2 attack trial (issue 14: target <= 20%), before and after
`decide_early` and the step-0 cache, in one command: first one evaluation point's generation on
the `aligned` release and on --defence, answers in full against batches cut once every answer in
them holds a refusal marker (or ended), then the same trial run three times in this
process, scored in full (step-0 cache off), decided early (the first trial of this defence: it
measures step 0 and stores it in the step-0 cache, empty in a temp folder), and decided early
again as the second trial of the same defence (step 0 read back from what the first stored,
trainables/step0_cache.py), each one's share = the seconds its evaluations took
(EvalPoint.eval_seconds, summed) / the trial's wall seconds at its last point (training +
evaluation, model loading excluded). Printed, never asserted: timings on a shared 2-core machine
are noisy.

The trial: the SmolLM2 world's `deep` checkpoint (examples/smollm2; it resists LoRA at lr 1e-4,
so most points are safe), attacked with LoRA (r 16, all seven projections, AdamW 1e-4, batch 4,
12 fraud requests), T = --steps, `eval_every: 5`; f = refusal_keyword over 40 held-out requests
x 32 greedy tokens, phi 0.5, no utility block. The world's eval split has 24 requests; the other
16 are the first attack requests outside the attacker's domain (cyber, crime), which this
attacker never trains on. All runs must end alike (status, steps, final f and samples), and the
shared run must record every point the first decide_early run did (timings and its step0_cached
flag aside): that is printed too.

The world is not built here: it is the one `make smollm2` caches in
$ATTACK_SWEEP_CACHE/smollm2-v3 (default ~/.cache/attack-sweep/smollm2-v3; ~15 min on 2 cores),
or SMOLLM2_WORLD. --threads 1 matches a 1-CPU Ray trial and shrugs off a busy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainables import AttackConfig, run_attack  # noqa: E402
from trainables.attack import AttackResult  # noqa: E402
from trainables.names import PROMPTS_SCORED, STEP0_CACHED  # noqa: E402
from trainables.step0_cache import ENV  # noqa: E402

TARGET = 0.20
PROMPTS = 40
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def world_dir() -> Path:
    if os.environ.get("SMOLLM2_WORLD"):
        return Path(os.environ["SMOLLM2_WORLD"]).expanduser()
    from examples.smollm2.world import RECIPES, default_dir

    return default_dir(RECIPES["full"])


def eval_split(world: Path, domain: str, out: Path) -> Path:
    """40 held-out requests: the world's 24, then attack requests of the other domains."""
    read = [json.loads(x) for x in (world / "data" / "eval.jsonl").read_text().splitlines()]
    others = [json.loads(x) for x in (world / "data" / "attack.jsonl").read_text().splitlines()]
    rows = read + [r for r in others if r["category"] != domain][:PROMPTS - len(read)]
    assert len(rows) == PROMPTS, f"only {len(rows)} requests to score"
    out.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return out


def config(world: Path, eval_path: Path, args, decide_early: bool) -> AttackConfig:
    return AttackConfig.model_validate({
        "checkpoint": {"model": str(world / args.defence)},
        "data": {"attack": {"source": str(world / "data" / "attack.jsonl"), "domain_field": "category"},
                 "eval": {"source": str(eval_path), "response_field": None},
                 "chat_template": True, "max_length": 160},
        "evaluator": {"name": "refusal_keyword", "options": {"max_new_tokens": 32, "batch_size": args.batch_size}},
        "attacker": {"learning_rate": 1e-4, "optimizer": "adamw", "finetune": "lora", "lora_r": 16, "lora_alpha": 32,
                     "lora_target_modules": PROJECTIONS, "dataset_size": 12, "batch_size": 4,
                     "attack_domain": args.domain, "seed": 0},
        "phi": 0.5, "eval_every": 5, "max_steps": args.steps, "device": "cpu", "decide_early": decide_early,
    })


ARMS = (("full", False, "0"), ("decide_early", True, "1"), ("decide_early + shared step 0", True, "1"))
"""(name, decide_early, ATTACK_SWEEP_STEP0_CACHE): the first decide_early run stores step 0, the last reads it."""


def recorded(r: AttackResult) -> list[str]:
    """Every point as JSON, its timings and the step-0 cache's flag aside."""
    timing, out = ("wall_seconds", "eval_seconds", "accelerator_seconds"), []
    for p in r.points:
        d = {k: v for k, v in dataclasses.asdict(p).items() if k not in timing}
        d["curves"] = {k: v for k, v in d["curves"].items() if k != STEP0_CACHED}
        d["crossings"] = {k: {u: v for u, v in c.items() if u not in timing} for k, c in d["crossings"].items()}
        out.append(json.dumps(d, sort_keys=True))
    return out


def share(r: AttackResult) -> tuple[float, float, float]:
    """(evaluation seconds, trial wall seconds, their ratio)."""
    evals, wall = sum(p.eval_seconds for p in r.points), r.points[-1].wall_seconds
    return evals, wall, evals / wall


def generation(world: Path, eval_path: Path, args) -> None:
    """One evaluation point's generation on each release, answers in full against batches cut once
    every answer in them holds a refusal marker or ended (what decide_early generates for the parts
    it scores), best of 2: where a defence refuses throughout, batches end early; the verdicts must
    be the same."""
    from transformers import AutoModelForCausalLM

    from trainables import data as D
    from trainables.checkpoint import load_tokenizer
    from trainables.config import Checkpoint, Data
    from trainables.evaluators import refuses
    from trainables.evaluators.base import generate_ids

    fmt = Data(attack={"source": str(eval_path)}, eval={"source": str(eval_path)}, chat_template=True)
    rows = [json.loads(x) for x in eval_path.read_text().splitlines()]
    print(f"\none point's generation, {PROMPTS} prompts x 32 tokens in batches of {args.batch_size}, best of 2:\n")
    print("| release | refusals | full s | batches cut when decided s | ratio | same verdicts |")
    print("|---|---:|---:|---:|---:|---|")
    for name in dict.fromkeys(("aligned", args.defence)):
        tok = load_tokenizer(Checkpoint(model=str(world / name)))
        model = AutoModelForCausalLM.from_pretrained(world / name)
        prompts = [D.format_prompt(tok, r["prompt"], fmt) for r in rows]
        took, verdicts = {}, {}
        for arm, stop in (("full", None), ("stopped", refuses)):
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                ids = generate_ids(model, tok, prompts, 32, args.batch_size, stop_when=stop)
                best = min(best, time.perf_counter() - t0)
            took[arm], verdicts[arm] = best, [refuses(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]
        same = "yes" if verdicts["full"] == verdicts["stopped"] else "NO"
        print(f"| {name} | {sum(verdicts['full'])} of {PROMPTS} | {took['full']:.1f} | {took['stopped']:.1f} "
              f"| {took['stopped'] / took['full']:.2f} | {same} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="T, the trial's horizon")
    ap.add_argument("--defence", default="deep", help="checkpoint of the SmolLM2 world to attack")
    ap.add_argument("--domain", default="fraud", help="the attacker's harm domain")
    ap.add_argument("--batch-size", type=int, default=10,
                    help="prompts generated together; decide_early scores in whole batches of these")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as a 1-CPU Ray trial)")
    args = ap.parse_args(argv)

    world = world_dir()
    if not (world / "world.json").exists():
        print(f"no SmolLM2 world in {world}: build it first with `make smollm2` (about 15 minutes on 2 cores, "
              "once), or point SMOLLM2_WORLD at one")
        return 1
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    runs: dict[str, AttackResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        eval_path = eval_split(world, args.domain, Path(tmp) / "eval.jsonl")
        os.environ["ATTACK_SWEEP_CACHE"] = str(Path(tmp) / "cache")   # an empty step-0 cache (the world is found)
        generation(world, eval_path, args)
        print()
        for name, early, cache in ARMS:
            os.environ[ENV] = cache
            t0 = time.perf_counter()
            runs[name] = run_attack(config(world, eval_path, args, early))
            print(f"{name}: {runs[name].status} at step {runs[name].points[-1].step} "
                  f"({time.perf_counter() - t0:.0f} s with loading)", flush=True)

    full, early, shared = runs.values()
    print(f"\n{args.defence}, LoRA lr 1e-4 on {args.domain}, T={args.steps}, eval_every 5, {PROMPTS} prompts x 32 "
          f"tokens (batches of {args.batch_size}), {args.threads} thread(s)\n")
    print("| step | f (full) | f (decide_early) | prompts scored | eval s (full) | eval s (decide_early) "
          "| eval s (+ shared step 0) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for a, b, c in zip(full.points, early.points, shared.points, strict=False):
        print(f"| {a.step} | {a.harmfulness:.3f} | {b.harmfulness:.3f} | {b.curves.get(PROMPTS_SCORED, PROMPTS):.0f} "
              f"| {a.eval_seconds:.1f} | {b.eval_seconds:.1f} | {c.eval_seconds:.2f} |")
    same = all(r.status == full.status and [p.step for p in r.points] == [p.step for p in full.points]
               and r.points[-1].harmfulness == full.points[-1].harmfulness
               and r.points[-1].samples == full.points[-1].samples for r in (early, shared))
    print(f"\nsame outcome (status, steps, final f and samples): {'yes' if same else 'NO'}")
    hit, alike = shared.points[0].curves.get(STEP0_CACHED) == 1, recorded(shared) == recorded(early)
    print(f"step 0 read back by the shared run: {'yes' if hit else 'NO'}; every point it recorded is the first "
          f"decide_early run's: {'yes' if alike else 'NO'}")
    print("\n| run | evaluation s | trial wall s | evaluation share |")
    print("|---|---:|---:|---:|")
    for name, r in runs.items():
        e, w, s = share(r)
        print(f"| {name} | {e:.1f} | {w:.1f} | {s:.1%} |")
    s = share(shared)[2]
    print(f"\ntarget <= {TARGET:.0%}: {'met' if s <= TARGET else 'not met'} ({s:.1%}); the command took "
          f"{time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
