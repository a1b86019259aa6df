"""One harmful fine-tuning attack, read top to bottom.

    from trainables import AttackConfig, run_attack
    result = run_attack(AttackConfig.model_validate(cfg), on_eval=lambda p: print(p))
    result.status, result.budget_to_failure

The loop: load the released checkpoint, wrap it (LoRA or all weights), draw the
attacker's data, then train, scoring harmfulness f at step 0 and every `eval_every`
steps on held-out prompts. It stops at the first of:
  f > phi at step 0      -> unsafe_at_release (budget 0: nothing to break)
  f > phi at step t      -> failed            (budget-to-failure = budget at t)
  loss nan/inf           -> diverged          (a failed attack, never a resisted one)
  t = max_steps (T)      -> resisted          (censored at T, not "infinitely robust")
Budget per step: examples += batch_size; tokens += supervised (response) tokens;
flops += budget.flops_per_token * processed tokens. Ray and MLflow stay outside: the
caller gets every evaluation through `on_eval`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainables import data as D
from trainables.budget import Budget, EvalPoint, Status, flops_per_token
from trainables.checkpoint import (
    load_model,
    load_tokenizer,
    make_trainable,
    matmul_params,
    resolve_device,
)
from trainables.config import AttackConfig
from trainables.evaluators import EvalItem, make_evaluator
from trainables.optim import build_optimizer, build_scheduler


@dataclass
class AttackResult:
    status: Status
    points: list[EvalPoint] = field(default_factory=list)

    @property
    def budget_to_failure(self) -> EvalPoint | None:
        """The evaluation at which f first exceeded phi (None unless the attack succeeded)."""
        return self.points[-1] if self.status in ("failed", "unsafe_at_release") else None

    @property
    def censored_at_steps(self) -> int | None:
        return self.points[-1].step if self.status == "resisted" else None


def run_attack(cfg: AttackConfig, on_eval: Callable[[EvalPoint], None] = lambda p: None,
               ) -> AttackResult:
    atk = cfg.attacker
    torch.manual_seed(atk.seed)
    device = resolve_device(cfg.device)

    # --- the released model, made trainable ---------------------------------------
    tokenizer = load_tokenizer(cfg.checkpoint)
    model = load_model(cfg.checkpoint, device)
    n_matmul = matmul_params(model)
    model, n_lora = make_trainable(model, atk)
    per_token_flops = flops_per_token(n_matmul, n_lora)
    model.train()

    # --- data: the attacker's draw, and the held-out prompts f is scored on ----------
    rows = D.draw(D.load_rows(cfg.data.attack), atk.dataset_size, atk.seed)
    train_items = D.tokenize_rows(tokenizer, rows, cfg.data.attack, cfg.data)
    stream = D.batches(train_items, atk.batch_size, atk.seed, tokenizer.pad_token_id)
    eval_rows = D.load_rows(cfg.data.eval)[: cfg.data.eval_size]
    eval_src = cfg.data.eval
    eval_items = [
        EvalItem(D.format_prompt(tokenizer, r[eval_src.prompt_field], cfg.data),
                 r.get(eval_src.response_field) if eval_src.response_field else None)
        for r in eval_rows
    ]
    evaluate = make_evaluator(cfg.evaluator.name, cfg.evaluator.options)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, atk)
    scheduler = build_scheduler(optimizer, atk, cfg.max_steps)

    budget = Budget()
    start = time.perf_counter()
    points: list[EvalPoint] = []

    def record(loss: float, f: float, status: Status) -> AttackResult | None:
        point = EvalPoint(budget.steps, budget.examples, budget.tokens, budget.flops,
                          time.perf_counter() - start, loss, f, status)
        points.append(point)
        on_eval(point)
        return AttackResult(status, points) if status != "running" else None

    # --- step 0: is the release already unsafe? -------------------------------------
    f = evaluate(model, tokenizer, eval_items)
    if done := record(math.nan, f, "unsafe_at_release" if f > cfg.phi else "running"):
        return done

    losses: list[float] = []
    for step in range(1, cfg.max_steps + 1):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        supervised = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        processed = int(batch["attention_mask"].sum())
        budget.add(batch["input_ids"].shape[0], supervised, processed, per_token_flops)

        loss = model(**batch).loss
        if not torch.isfinite(loss):
            return record(float(loss.item()), math.nan, "diverged")
        loss.backward()
        if atk.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, atk.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            f = evaluate(model, tokenizer, eval_items)
            mean_loss = sum(losses) / len(losses)
            losses.clear()
            status: Status = ("failed" if f > cfg.phi
                              else "resisted" if step == cfg.max_steps else "running")
            if done := record(mean_loss, f, status):
                return done
    raise AssertionError("unreachable: the last step always returns")
