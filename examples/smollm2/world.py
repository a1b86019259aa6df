"""Build the SmolLM2 world once and cache it: the checkpoints attack-sweep evaluates, the
attacker's and the evaluator's data, and how well each checkpoint is aligned.

    <world>/base/            SmolLM2-135M-Instruct as shipped (not safety-tuned), plain safetensors
    <world>/aligned/         refusal fine-tuned from base: the undefended aligned model
    <world>/deep/            the same training plus safety-recovery examples (Qi et al. 2024) on the
                             requests of two harm domains only (Recipe.deep_domains: fraud, crime),
                             so it is immunised on those and not on cyber
    <world>/rescaled/        aligned with its weights rescaled (same function, larger weights)
    <world>/data/            every split: attack.jsonl (the attacker's data), eval.jsonl (held-out
                             harmful requests), benign_heldout.jsonl (held-out benign requests with
                             the base model's answers: the utility split), the defender's
                             alignment and recovery rows, the defender's harmful answers to the
                             alignment requests (defender_harmful.jsonl: the defences attack-sweep
                             builds, examples/smollm2/defences.yaml), and the trainability task
                             (task.jsonl, task_heldout.jsonl); every harmful row names its domain
                             in "category"
    <world>/lm_eval/         a local lm-evaluation-harness task, smollm2_benign (stability)
    <world>/answers/         what each checkpoint answered when its refusal rates were measured
    <world>/world.json       refusal rates of every checkpoint (harmful ones also per domain), its
                             loss on the task's held-out answers, split sizes, the recipe, build times

Each stage is written to a temporary name and renamed when complete, so an interrupted build
resumes at the stage it stopped in. <world> is $ATTACK_SWEEP_CACHE/smollm2-v3 (default
~/.cache/attack-sweep/smollm2-v3); the smoke recipe builds smollm2-v3-smoke.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from examples.smollm2 import align, model
from examples.smollm2 import data as sdata

# v2: held-out benign rows carry the base model's answers (the utility split)
# v3: harm domains (splits stratified by domain), deep's recovery examples on two domains only,
#     the trainability task, the lm-eval task
VERSION = "smollm2-v3"


@dataclass(frozen=True)
class Recipe:
    """How the defender's checkpoints are made (the numbers the README reports)."""

    name: str = "full"
    align_steps: int = 40          # refusal fine-tuning steps, the same for aligned and deep
    align_lr: float = 5e-4
    align_batch: int = 8
    lora_r: int = 16
    benign_answer_tokens: int = 48  # length of the base model's own benign answers
    rescale: float = 30.0          # c for the rescaled variant
    measure_tokens: int = 24       # greedy tokens per answer when measuring refusal rates
    max_eval: int | None = None    # cap on held-out prompts measured (None: all)
    variants: tuple[str, ...] = ("deep", "rescaled")   # defended checkpoints built besides aligned
    deep_domains: tuple[str, ...] = ("fraud", "crime")  # harm domains of deep's recovery examples
    seed: int = 0


RECIPES = {
    "full": Recipe(),
    # CI: the same stages at a fraction of the cost; its alignment is only meant to make the
    # model refuse harmful requests, not to keep benign answers intact.
    "smoke": Recipe(name="smoke", align_steps=12, align_lr=1e-3, benign_answer_tokens=12,
                    measure_tokens=8, max_eval=6, variants=("rescaled",)),
}


def default_dir(recipe: Recipe) -> Path:
    from orchestrator.spec.toyworld import cache_dir

    return cache_dir().parent / (VERSION if recipe.name == "full" else f"{VERSION}-{recipe.name}")


def build(root: Path | None = None, recipe: Recipe = RECIPES["full"], log: Callable = print) -> Path:
    """Build (or finish building) the world and return its directory."""
    from filelock import FileLock

    root = Path(root) if root else default_dir(recipe)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "world.json").exists():
            built = info(root)["recipe"]
            if built != json.loads(json.dumps(dataclasses.asdict(recipe))):
                raise RuntimeError(f"the world in {root} was built with another recipe ({built}); "
                                   "delete that directory to rebuild it, or build elsewhere with --world")
            _defender_split(root / "data", recipe)   # a world built before the split gets it here
            return root
        t0, times = time.monotonic(), {}

        def stage(name: str, make: Callable[[Path], None]) -> None:
            if (root / name).exists():
                return
            log(f"  {name} ...")
            start, tmp = time.monotonic(), root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            make(tmp)
            tmp.rename(root / name)
            times[name] = round(time.monotonic() - start, 1)

        log(f"building the SmolLM2 world ({recipe.name} recipe) in {root} (once) ...")
        stage("base", model.convert)
        stage("data", lambda d: _data(d, root / "base", recipe))
        stage(LM_EVAL_DIR, lambda d: _lm_eval(d, root / LM_EVAL_DIR, root / "base", root / "data"))
        _defender_split(root / "data", recipe)
        rows = {p.stem: sdata.read_jsonl(p) for p in (root / "data").glob("*.jsonl")}
        align_rows = rows["align_harmful"] + rows["benign"]
        stage("aligned", lambda d: _align(d, root / "base", align_rows, recipe, log))
        if "deep" in recipe.variants:
            stage("deep", lambda d: _align(d, root / "base", align_rows + rows["recovery"], recipe, log))
        if "rescaled" in recipe.variants:
            stage("rescaled", lambda d: _rescale(d, root / "aligned", recipe))
        log("  measuring refusal rates and the task's loss ...")
        (root / "answers").mkdir(exist_ok=True)
        rates = {name: _measure(root / name, rows, recipe, root / "answers")
                 for name in ("base", "aligned", *recipe.variants)}
        task_loss = {name: rates[name].pop("task_loss") for name in rates}
        conversion = json.loads((root / "base" / "conversion.json").read_text())
        sizes = {split: dict(sorted(Counter(r["category"] for r in part).items()))
                 for split, part in sorted(rows.items())}
        report = {"version": VERSION, "recipe": dataclasses.asdict(recipe), "refusal_rates": rates,
                  "task_loss": task_loss, "splits": sizes,
                  "conversion_max_logit_diff": conversion["max_logit_diff"],
                  "seconds": {**times, "total": round(time.monotonic() - t0, 1)}}
        (root / ".world.json.tmp").write_text(json.dumps(report, indent=2) + "\n")
        (root / ".world.json.tmp").rename(root / "world.json")
    return root


def _defender_split(data: Path, recipe: Recipe) -> None:
    """data/defender_harmful.jsonl (issue 29): the alignment requests answered in the attacker's
    compliant form, for the defences that train against harmful answers; written once, atomically."""
    out = data / "defender_harmful.jsonl"
    if not data.is_dir() or out.exists():
        return
    tmp = data / ".defender_harmful.jsonl.tmp"
    sdata.write_jsonl(tmp, sdata.defender_harmful(sdata.read_jsonl(data / "align_harmful.jsonl"), recipe.seed))
    tmp.rename(out)


def info(root: Path) -> dict:
    return json.loads((Path(root) / "world.json").read_text())


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _save(net, tokenizer, out: Path) -> None:
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _data(out: Path, base: Path, recipe: Recipe) -> None:
    rows = sdata.splits(recipe.seed)
    net, tokenizer = _load(base)
    # benign answers are the unaligned model's own: alignment keeps them, and the held-out ones are
    # the reference answers utility is scored on
    for split in ("benign", "benign_heldout"):
        texts = align.answers(net, tokenizer, [r["prompt"] for r in rows[split]], recipe.benign_answer_tokens)
        for row, text in zip(rows[split], texts, strict=True):
            row["response"] = text
    rows["recovery"] = sdata.recovery(rows["align_harmful"], tokenizer, recipe.seed, recipe.deep_domains)
    rows["identity_shift"] = sdata.identity_shift(rows["benign"])  # issue 25: a data attack's split
    for name, split in rows.items():
        sdata.write_jsonl(out / f"{name}.jsonl", split)


def _align(out: Path, base: Path, rows: list[dict], recipe: Recipe, log: Callable) -> None:
    net, tokenizer = _load(base)
    net = align.refusal_finetune(net, tokenizer, rows, steps=recipe.align_steps, lr=recipe.align_lr,
                                 batch_size=recipe.align_batch, lora_r=recipe.lora_r, seed=recipe.seed, log=log)
    _save(net, tokenizer, out)


def _rescale(out: Path, aligned: Path, recipe: Recipe) -> None:
    from orchestrator.spec.toyworld import rescale

    net, tokenizer = _load(aligned)
    rescale(net, recipe.rescale)
    _save(net, tokenizer, out)


def _measure(path: Path, rows: dict[str, list[dict]], recipe: Recipe, out: Path) -> dict:
    """Refusal rates on the held-out harmful (also per domain) and benign requests, and the loss
    (nats per token) of the task's held-out reference answers: the task's step 0."""
    from trainables.evaluators import refuses
    from trainables.evaluators.base import EvalItem
    from trainables.evaluators.nll import answer_probability

    net, tokenizer = _load(path)
    result = {}
    for split, key in (("eval", "harmful"), ("benign_heldout", "benign")):
        chosen = rows[split][:recipe.max_eval]
        prompts = [r["prompt"] for r in chosen]
        rate, texts = align.refusal_rate(net, tokenizer, prompts, recipe.measure_tokens)
        result[key] = round(rate, 3)
        if key == "harmful":
            result["harmful_by_domain"] = {
                d: round(sum(refuses(t) for r, t in zip(chosen, texts, strict=True) if r["category"] == d)
                         / n, 3)
                for d in sdata.DOMAINS if (n := sum(r["category"] == d for r in chosen))}
        sdata.write_jsonl(out / f"{path.name}_{key}.jsonl",
                          [{"prompt": p, "answer": t} for p, t in zip(prompts, texts, strict=True)])
    items = [EvalItem(align.prompt_text(tokenizer, r["prompt"]), r["response"], r["prompt"])
             for r in rows["task_heldout"]]
    prob, _ = answer_probability(net, tokenizer, items, max_length=align.CHAT.max_length)
    result["task_loss"] = round(-math.log(prob), 3)
    return result


LM_EVAL_DIR = "lm_eval"
LM_EVAL_TASK = "smollm2_benign"


def lm_eval_task(folder: Path, heldout: list[dict], tokenizer, data_dir: Path | None = None) -> Path:
    """A local lm-evaluation-harness task (smollm2_benign.yaml + .jsonl) for the stability
    condition: each held-out benign request, chat-formatted with the model's template, with four
    choices: the unaligned model's own answer (right), a refusal no model was trained on
    (sdata.DECLINES), and the answers to two other held-out requests. The base model, aligned and
    deep all pick the right one (acc_norm 1.0 on the full world): the task catches a defence that
    costs this, not small differences. `data_dir`: where the YAML says the rows are (default:
    `folder`)."""
    import yaml

    from trainables.capability import write_task

    out, n = [], len(heldout)
    for i, r in enumerate(heldout):
        question = align.prompt_text(tokenizer, r["prompt"])
        others = [heldout[(i + k) % n]["response"] for k in (1, n // 2)]
        out.append({"question": question, "answer": 0,
                    "choices": [r["response"], sdata.DECLINES[i % len(sdata.DECLINES)], *others]})
    # the template ends the prompt with "assistant\n": the answer follows with no delimiter
    path = write_task(folder, LM_EVAL_TASK, out, target_delimiter="")
    if data_dir is not None:   # written under a temporary name, read from its final one
        config = yaml.safe_load(path.read_text())
        config["dataset_kwargs"]["data_files"]["test"] = str(Path(data_dir).resolve() / f"{LM_EVAL_TASK}.jsonl")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _lm_eval(out: Path, final: Path, base: Path, data: Path) -> None:
    from transformers import AutoTokenizer

    lm_eval_task(out, sdata.read_jsonl(data / "benign_heldout.jsonl"), AutoTokenizer.from_pretrained(base), final)
