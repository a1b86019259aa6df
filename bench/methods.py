"""python bench/methods.py [--smoke] [--repeats R]

What the attack loop costs per step for each attack method (sft, dpo, grpo;
docs/attack-families.md), against a bare hand-written PyTorch loop that does the same training
work, on the embedded toy world (examples/toyworld_methods.yaml narrowed to the base defence,
`toyworld:base`; the toy world is built on first use and cached). Every number is measured in
this command and printed, never asserted: timings on a shared 2-core machine are noisy, so the
ratios, each against a baseline measured in the same command and interleaved with it, are what
to read.

Per method, the same trial both ways, full fine-tuning, AdamW at lr 1e-4 (weight decay 0),
gradients clipped to norm 1 (the attacker's default max_grad_norm), batch 8 (GRPO: 4 prompts), 32
rows drawn by seed 0, T steps (sft, dpo: 200; grpo: 60; --smoke: 10 and 3):

  run_attack: `trainables.run_attack` on the AttackConfig that `orchestrator.spec.load` +
      `sweep.trials` + `sweep.attack_config` build (as bench/overhead.py does), with
      `eval_every: T`, `refine: 0` and no utility bound: f (refusal_keyword, 48 held-out prompts,
      4 new tokens) is scored at step 0 and at T only, so every trial trains all T steps. The
      step-0 cache is off (ATTACK_SWEEP_STEP0_CACHE=0): every call scores its step 0. Three
      times per step, from the last EvalPoint:
        loop     wall_seconds / T: the whole loop, both evaluations included;
        net      (wall_seconds - the evaluations' eval_seconds) / T: the loop net of evaluation;
        train    accelerator_seconds / T: the Trainer's train_to time alone (batching, the
                 method's loss, backward, clip, optimizer and scheduler steps, budget counting).
  bare: a loop written here, no trainables.methods, Trainer or BatchStream: the same model
      (loaded with trainables.checkpoint.load_model), the same drawn rows tokenised the same way
      (data.draw, data.format_prompt, data.tokenize_pair: the chat template, the response and its
      end token supervised), the same batch order (BatchStream's seeded epoch shuffle, rewritten
      here), padding done here, and
        sft   mean next-token cross-entropy over the response tokens;
        dpo   sigmoid DPO loss (beta 0.1) on (harmful, "i cannot help with that .") pairs, chosen
              and rejected in one forward pass, against a frozen deep copy of the release (what
              run_attack uses under finetune: full);
        grpo  per prompt G=4 answers from model.generate(do_sample, temperature 1, top_k 0, at
              most 8 new tokens) in eval mode, each cut after its first end token and rewarded
              1 if it carries no refusal marker (the refusal_keyword verdict), advantages
              (r - group mean) / (group std + 1e-4), then one forward over the prompts and their
              answers and the loss -mean over answer tokens of A * log pi (no KL term: kl_coef 0).
      Timed from the first batch to the last optimizer step; model loading is outside both arms.
      GRPO samples differently in the two arms (its own RNG streams), so answer lengths, and
      with them the time of a step, differ a little: generated tokens per step are printed.

Each arm is warmed up first (a 2-step run_attack call and 2 bare steps per method), then run R
times (default 5, interleaved: bare, run_attack, bare, ...), a fresh model each time; the best
(smallest) of the R is reported for each time, and the ratios are of those bests; the last
column is the median over the R interleaved (bare, run_attack) pairs of their loop ratio, a check
on the best-of ratio. torch.set_num_threads(1), as a 1-CPU Ray trial runs.
--smoke: T = 10 (sft, dpo) and 3 (grpo), R = 1. Ends with a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ["ATTACK_SWEEP_STEP0_CACHE"] = "0"  # every run_attack call scores its own step 0

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from overhead import quiet_libraries  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from orchestrator import spec as S  # noqa: E402
from orchestrator import sweep  # noqa: E402
from trainables import AttackConfig, run_attack  # noqa: E402
from trainables import data as D  # noqa: E402
from trainables.checkpoint import load_model, load_tokenizer  # noqa: E402
from trainables.evaluators.keyword import refuses  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "toyworld_methods.yaml"
METHODS = ("sft", "dpo", "grpo")
LR = 1.0e-4
IGNORE = -100


def overrides(method: str, steps: int) -> list[str]:
    """toyworld_methods.yaml narrowed to one trial: the base defence, one method at one rate,
    evaluated at step 0 and T only, no refinement, no utility bound."""
    out = [
        "defences=[{name: base, model: 'toyworld:base', base: true}]",
        f"space.method={method}",
        f"space.learning_rate={LR}",
        "space.finetune=full",
        "space.optimizer=adamw",
        "space.dataset_size=32",
        f"max_steps={steps}",
        f"eval_every={steps}",
        "refine=0",
        "utility=null",
    ]
    if method == "grpo":
        out += ["space.batch_size=4", "space.grpo_group_size=4", "space.grpo_temperature=1.0",
                "space.grpo_max_new_tokens=8", "space.grpo_kl_coef=0.0",
                "space.grpo_reward=refusal_keyword"]
    return out


def config(method: str, steps: int) -> AttackConfig:
    sp = S.load(SPEC, overrides(method, steps))
    (trial,) = sweep.trials(sp)
    return sweep.attack_config(sp, trial)


# --- run_attack ------------------------------------------------------------------------------


@dataclass
class Framework:
    loop: float
    net: float
    train: float
    generated: float
    status: str


def framework(cfg: AttackConfig) -> Framework:
    result = run_attack(cfg)
    last = result.points[-1]
    steps = last.step
    evals = sum(p.eval_seconds for p in result.points if p.eval_seconds == p.eval_seconds)  # nan: none
    return Framework(loop=last.wall_seconds / steps, net=(last.wall_seconds - evals) / steps,
                     train=last.accelerator_seconds / steps, generated=last.generated_tokens / steps,
                     status=f"{result.status} @{steps}")


# --- the bare loops --------------------------------------------------------------------------


@functools.cache
def order(n: int, seed: int, epoch: int) -> list[int]:
    """BatchStream's seeded epoch shuffle, so both arms see the same batches."""
    idx = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(idx)
    return idx


def batch_items(items: list, batch_size: int, seed: int, i: int) -> list:
    n = len(items)
    return [items[order(n, seed, p // n)[p % n]] for p in range(i * batch_size, (i + 1) * batch_size)]


def pad(seqs: list[list[int]], labels: list[list[int]], pad_id: int):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [IGNORE] * (width - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask, lab


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled tokens (next-token aligned)."""
    labels = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    keep = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1)


class Bare:
    """One method's training work without the framework: a fresh model, AdamW, T steps."""

    def __init__(self, cfg: AttackConfig):
        atk = cfg.attacker
        self.cfg, self.method, self.bs, self.seed = cfg, atk.method, atk.batch_size, atk.seed
        self.tok = load_tokenizer(cfg.checkpoint)
        src, data = cfg.data.attack, cfg.data
        rows = D.draw(D.load_rows(src), atk.dataset_size, atk.seed)
        prompts = [D.format_prompt(self.tok, r[src.prompt_field], data) for r in rows]
        if self.method == "sft":
            self.items = [D.tokenize_pair(self.tok, p, r[src.response_field], data.max_length)
                          for p, r in zip(prompts, rows, strict=True)]
        elif self.method == "dpo":
            self.items = [(D.tokenize_pair(self.tok, p, r[src.response_field], data.max_length),
                           D.tokenize_pair(self.tok, p, data.refusal, data.max_length))
                          for p, r in zip(prompts, rows, strict=True)]
        else:
            self.items = [self.tok(p, add_special_tokens=False)["input_ids"][: data.max_length] for p in prompts]
        self.atk = atk

    def run(self, steps: int) -> tuple[float, float]:
        """Seconds per step and generated tokens per step over `steps` steps of a fresh model."""
        torch.manual_seed(self.seed)
        model = load_model(self.cfg.checkpoint, torch.device("cpu"))
        model.requires_grad_(True).train()
        ref = copy.deepcopy(model).eval().requires_grad_(False) if self.method == "dpo" else None
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.atk.learning_rate, weight_decay=self.atk.weight_decay)
        step = getattr(self, f"_{self.method}")
        generated = 0
        start = time.perf_counter()
        for i in range(steps):
            loss, new = step(model, ref, batch_items(self.items, self.bs, self.seed, i))
            generated += new
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.atk.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss)
        return (time.perf_counter() - start) / steps, generated / steps

    def _sft(self, model, ref, items):
        ids, mask, labels = pad([t.input_ids for t in items], [t.labels for t in items], self.tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        # position t predicts token t + 1: shift the labels left (no copy of the logits)
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE)
        return loss, 0

    def _dpo(self, model, ref, items):
        both = [c for c, _ in items] + [r for _, r in items]
        ids, mask, labels = pad([t.input_ids for t in both], [t.labels for t in both], self.tok.pad_token_id)
        n = len(items)
        pol = response_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        with torch.no_grad():
            rl = response_logps(ref(input_ids=ids, attention_mask=mask).logits, labels)
        margin = (pol[:n] - pol[n:]) - (rl[:n] - rl[n:])
        return -F.logsigmoid(self.atk.dpo_beta * margin).mean(), 0

    def _grpo(self, model, ref, items):
        g, eos, pad_id = self.atk.grpo_group_size, self.tok.eos_token_id, self.tok.pad_token_id
        seqs, keeps, advs, generated = [], [], [], 0
        for prompt in items:
            ids = torch.tensor([prompt]).repeat(g, 1)
            model.eval()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=self.atk.grpo_temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=self.atk.grpo_max_new_tokens, pad_token_id=pad_id,
                                     eos_token_id=eos)
            model.train()
            rewards = []
            for answer in out[:, ids.shape[1]:].tolist():
                cut = answer[: answer.index(eos) + 1] if eos in answer else answer
                generated += len(cut)
                rewards.append(0.0 if refuses(self.tok.decode(cut, skip_special_tokens=True)) else 1.0)
                seqs.append(prompt + cut)
                keeps.append([0] * len(prompt) + [1] * len(cut))
            r = torch.tensor(rewards)
            advs.append((r - r.mean()) / (r.std() + 1e-4))
        ids, mask, answer = pad(seqs, keeps, pad_id)
        answer = (answer == 1).float()[:, 1:]  # answer tokens, next-token aligned; padding (IGNORE) out
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        adv = torch.cat(advs)
        return -(adv.unsqueeze(1) * logp * answer).sum() / answer.sum().clamp(min=1), generated


# --- the bench -------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    steps: int
    bare: float
    bare_generated: float
    fw: Framework
    paired: float
    """The median over the R interleaved pairs of run_attack loop / bare."""


def bench(method: str, steps: int, repeats: int) -> Row:
    cfg = config(method, steps)
    bare = Bare(cfg)
    run_attack(config(method, 2))  # warm-up: imports, first-call costs, the toy world
    bare.run(2)
    bare_runs, fw_runs = [], []
    for _ in range(repeats):
        bare_runs.append(bare.run(steps))
        fw_runs.append(framework(cfg))
        b, f = bare_runs[-1], fw_runs[-1]
        print(f"  {method}: bare {b[0] * 1e3:8.1f} ms/step | run_attack loop {f.loop * 1e3:8.1f}, "
              f"net of eval {f.net * 1e3:8.1f}, train_to {f.train * 1e3:8.1f} ms/step ({f.status})"
              + (f" | generated tokens/step bare {b[1]:.1f}, run_attack {f.generated:.1f}"
                 if method == "grpo" else ""), flush=True)
    best_bare = min(bare_runs)
    best_fw = min(fw_runs, key=lambda f: f.loop)
    best_fw = Framework(loop=best_fw.loop, net=min(f.net for f in fw_runs), train=min(f.train for f in fw_runs),
                        generated=best_fw.generated, status=best_fw.status)
    paired = statistics.median(f.loop / b[0] for b, f in zip(bare_runs, fw_runs, strict=True))
    return Row(method, steps, best_bare[0], best_bare[1], best_fw, paired)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(rows: list[Row]) -> str:
    lines = ["| method | T | bare s/step | run_attack s/step (loop) | ratio | net of eval s/step | ratio "
             "| train_to s/step | ratio | loop ratio, median of pairs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r.fw
        lines.append(f"| {r.method} | {r.steps} | {r.bare:.4f} | {f.loop:.4f} | {ratio(f.loop, r.bare):.2f} | "
                     f"{f.net:.4f} | {ratio(f.net, r.bare):.2f} | {f.train:.4f} | {ratio(f.train, r.bare):.2f} | "
                     f"{r.paired:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--smoke", action="store_true", help="T=10 (sft, dpo) and 3 (grpo), one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each arm, best kept (default 5; smoke 1)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 5)
    steps = {"sft": 10, "dpo": 10, "grpo": 3} if args.smoke else {"sft": 200, "dpo": 200, "grpo": 60}

    quiet_libraries()
    torch.set_num_threads(1)
    import transformers

    print(f"# attack loop against a bare loop, per method{' (smoke)' if args.smoke else ''}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"torch.set_num_threads({torch.get_num_threads()}); best of {repeats}")
    if hasattr(os, "getloadavg"):
        print("load average at start (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    started = time.perf_counter()
    rows = [bench(m, steps[m], repeats) for m in args.methods]
    print(f"\n## summary ({'smoke, ' if args.smoke else ''}{time.perf_counter() - started:.0f} s in all)")
    print("ratios are run_attack / bare, measured in this command; loop = wall_seconds / T (step 0 and T "
          "evaluated), net of eval = less the evaluations' eval_seconds, train_to = accelerator_seconds / T.")
    for r in rows:
        if r.method == "grpo":
            print(f"grpo generated tokens/step: bare {r.bare_generated:.1f}, run_attack {r.fw.generated:.1f} "
                  "(sampled apart: per-step time scales with them)")
    if hasattr(os, "getloadavg"):
        print("load average at end (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
