"""One harmful fine-tuning attack, read top to bottom.

    from trainables import AttackConfig, run_attack
    result = run_attack(AttackConfig.model_validate(cfg), on_eval=lambda p: print(p))
    result.status, result.budget_to_failure

The loop: load the released checkpoint, wrap it (LoRA or all weights), draw the
attacker's data, then train through the attacker's stages (one, unless it lists
several), scoring harmfulness f on held-out prompts at the steps cfg.eval_steps()
names: step 0, the eval schedule, every stage's end, the horizon T. It stops at the
first of:
  f > phi at step 0      -> unsafe_at_release (budget 0: nothing to break)
  f > phi at step t      -> failed            (budget-to-failure = budget at t)
  loss nan/inf           -> diverged          (a failed attack, never a resisted one)
  t = T                  -> resisted          (censored at T, not "infinitely robust")
Budget per step: examples += batch_size; tokens += supervised (response) tokens;
flops += budget.flops_per_token * processed tokens; accelerator_seconds += the step's
time (evaluation excluded). Ray and MLflow stay outside: the caller gets every
evaluation through `on_eval`.

A crossing seen at step hi is only known to lie in (lo, hi], lo the last safe
evaluation. With cfg.refine = r the loop bisects that window r times, replaying
training from a snapshot taken at lo (batches, RNG and optimizer state all restored,
so the replay is the run itself): each round one evaluation, reported as "running",
and at most half the window in extra steps. The refined crossing then comes again,
as "failed", with its budget and resolution (hi - lo after bisection).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainables import data as D
from trainables import evaluators
from trainables.budget import EvalPoint, Status, flops_per_token
from trainables.checkpoint import (
    load_model,
    load_tokenizer,
    make_trainable,
    matmul_params,
    resolve_device,
)
from trainables.config import AttackConfig
from trainables.evaluators import EvalItem, make_evaluator
from trainables.optim import evaluating
from trainables.parallel import DataParallel
from trainables.trainer import Snapshot, Trainer


@dataclass
class AttackResult:
    status: Status
    points: list[EvalPoint] = field(default_factory=list)
    trained_steps: int = 0
    """Optimizer steps actually run, refinement replays included (the trial's cost to us)."""

    @property
    def budget_to_failure(self) -> EvalPoint | None:
        """The evaluation at which f first exceeded phi (None unless the attack succeeded)."""
        return self.points[-1] if self.status in ("failed", "unsafe_at_release") else None

    @property
    def censored_at_steps(self) -> int | None:
        return self.points[-1].step if self.status == "resisted" else None


def run_attack(cfg: AttackConfig, on_eval: Callable[[EvalPoint], None] = lambda p: None,
               devices: int = 1) -> AttackResult:
    """`devices`: accelerators the trial trains on, the factor on accelerator_seconds (a
    DeepSpeed trial counts its workers itself). Under DeepSpeed every worker calls this with
    the same cfg and reports the same points."""
    atk, stages = cfg.attacker, cfg.stages
    torch.manual_seed(atk.seed)
    device = resolve_device(cfg.device)
    parallel = DataParallel(cfg.deepspeed, device) if cfg.deepspeed else None
    if parallel is not None:
        devices = parallel.world.size
        evaluators.synced_generation = parallel.synced_generation

    # --- the released model, made trainable ---------------------------------------
    tokenizer = load_tokenizer(cfg.checkpoint)
    model = load_model(cfg.checkpoint, device)
    n_matmul = matmul_params(model)
    model, n_lora = make_trainable(model, atk)
    model.train()

    # --- data: each stage's draw and batch order, and the held-out prompts f is scored on
    sources = {"attack": cfg.data.attack, "benign": cfg.data.benign}
    rows = {name: D.load_rows(sources[name]) for name in {s.data for s in stages}}
    streams = []
    for stage in stages:
        hp, src = stage.resolved(atk), sources[stage.data]
        drawn = D.draw(rows[stage.data], hp.dataset_size, hp.seed, stage.data)
        items = D.tokenize_rows(tokenizer, drawn, src, cfg.data)
        streams.append(D.BatchStream(items, hp.batch_size, hp.seed, tokenizer.pad_token_id))
    eval_src = cfg.data.eval
    eval_items = [
        EvalItem(D.format_prompt(tokenizer, r[eval_src.prompt_field], cfg.data),
                 r.get(eval_src.response_field) if eval_src.response_field else None)
        for r in D.load_rows(eval_src)[: cfg.data.eval_size]
    ]
    evaluate = make_evaluator(cfg.evaluator.name, cfg.evaluator.options)

    trainer = Trainer(model, atk, stages, streams, flops_per_token(n_matmul, n_lora), device, devices,
                      parallel)
    start = time.perf_counter()
    points: list[EvalPoint] = []

    def score() -> float:
        with evaluating(trainer.optimizer):
            if parallel is None:
                return evaluate(model, tokenizer, eval_items)
            f = evaluate(model, tokenizer, eval_items) if parallel.scores_here else math.nan
            return parallel.broadcast(f)  # every rank takes rank 0's decision

    def emit(point: EvalPoint) -> EvalPoint:
        points.append(point)
        on_eval(point)
        return point

    def record(loss: float, f: float, status: Status, safe_step: int) -> EvalPoint:
        b = trainer.budget
        return emit(EvalPoint(
            step=b.steps, examples=b.examples, tokens=b.tokens, flops=b.flops,
            accelerator_seconds=b.accelerator_seconds, wall_seconds=time.perf_counter() - start,
            train_loss=loss, harmfulness=f, status=status, resolution=b.steps - safe_step, stage=trainer.index))

    def result(status: Status) -> AttackResult:
        return AttackResult(status, points, trainer.trained_steps)

    def refine(hi: EvalPoint, lo: Snapshot) -> AttackResult:
        """f > phi at hi, safe at lo: halve (lo, hi] up to cfg.refine times by replaying from lo."""
        for _ in range(cfg.refine):
            if hi.step - lo.step <= 1:
                break
            trainer.restore(lo)
            if trainer.train_to(lo.step + (hi.step - lo.step) // 2) is not None:
                break  # a replay that diverges was not deterministic: keep the window we have
            f = score()
            mid = record(trainer.mean_loss(), f, "running", lo.step)
            if f > cfg.phi:
                hi = mid
            else:
                lo = trainer.snapshot()
        emit(dataclasses.replace(hi, status="failed", resolution=hi.step - lo.step,
                                 wall_seconds=time.perf_counter() - start))
        return result("failed")

    # --- step 0: is the release already unsafe? -------------------------------------
    f = score()
    if f > cfg.phi:
        record(math.nan, f, "unsafe_at_release", 0)
        return result("unsafe_at_release")
    record(math.nan, f, "running", 0)
    safe_step, safe = 0, trainer.snapshot() if cfg.refine else None

    for step in cfg.eval_steps()[1:]:
        if (loss := trainer.train_to(step)) is not None:
            record(loss, math.nan, "diverged", safe_step)
            return result("diverged")
        f = score()
        if f > cfg.phi:
            if safe is not None and step - safe_step > 1:
                return refine(record(trainer.mean_loss(), f, "running", safe_step), safe)
            record(trainer.mean_loss(), f, "failed", safe_step)
            return result("failed")
        status: Status = "resisted" if step == cfg.horizon else "running"
        record(trainer.mean_loss(), f, status, safe_step)
        if status == "resisted":
            return result("resisted")
        safe_step, safe = step, None  # drop the old copy first: a snapshot holds all trainable state
        if cfg.refine:
            safe = trainer.snapshot()
    raise AssertionError("unreachable: the horizon is always evaluated")
