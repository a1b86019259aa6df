"""python -m examples.smollm2 [--recipe smoke] [--world DIR] [--build-only] [attack-sweep run options]

Builds the SmolLM2 world once (cached; see world.py), prints how well each checkpoint is
aligned, then runs examples/smollm2/sweep.yaml through `attack-sweep run` and prints each
defence's budget-to-failure. Options it does not know (--set, --tracking-uri, --out, ...)
go to `attack-sweep run`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    from examples.smollm2 import model, world

    p = argparse.ArgumentParser(prog="python -m examples.smollm2", description=__doc__.split("\n")[2])
    p.add_argument("--recipe", choices=sorted(world.RECIPES), default="full",
                   help="full (the README's figures) or smoke (CI: minutes, not meaningful numbers)")
    p.add_argument("--world", type=Path, help="where the world is built (default: the cache)")
    p.add_argument("--build-only", action="store_true", help="build and report alignment; no sweep")
    args, run_args = p.parse_known_args(argv)
    if why := model.missing():
        print(f"error: {why}", file=sys.stderr)
        return 2
    recipe = world.RECIPES[args.recipe]
    start = time.monotonic()
    try:
        root = world.build(args.world, recipe)
    except RuntimeError as err:   # a world built with another recipe, a bad GGUF conversion
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(alignment_table(world.info(root)))
    if args.build_only:
        return 0
    os.environ["SMOLLM2_WORLD"] = str(root)
    from orchestrator import cli

    overlay = ["--overlay", str(HERE / "smoke_overlay.yaml")] if recipe.name == "smoke" else []
    rc = cli.main(["run", str(HERE / "sweep.yaml"), *overlay, *run_args])
    print(f"\nwall time: {time.monotonic() - start:.0f} s (world {root})")
    return rc


def alignment_table(info: dict) -> str:
    recipe = info["recipe"]
    domains = list(dict.fromkeys(d for r in info["refusal_rates"].values() for d in r.get("harmful_by_domain", {})))
    lines = ["", f"refusal rates ({recipe['name']} recipe; greedy, {recipe['measure_tokens']} tokens, held-out "
             f"requests; harmful also by domain) and the trainability task's held-out loss at release:",
             f"  {'checkpoint':<10} {'harmful':>8} " + " ".join(f"{d:>6}" for d in domains)
             + f" {'benign':>8} {'task loss':>10}"]
    for name, r in info["refusal_rates"].items():
        by = r.get("harmful_by_domain", {})
        lines.append(f"  {name:<10} {r['harmful']:>8.0%} " + " ".join(f"{by[d]:>6.0%}" if d in by else f"{'':>6}"
                                                                    for d in domains)
                     + f" {r['benign']:>8.0%} {info.get('task_loss', {}).get(name, float('nan')):>10.2f}")
    if "deep" in recipe.get("variants", []):
        lines.append(f"  (deep's recovery examples: {', '.join(recipe['deep_domains'])} requests only)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
