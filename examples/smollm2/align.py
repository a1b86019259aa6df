"""The defender's side: make checkpoints for attack-sweep to evaluate. Nothing here is part of
the attack tool; it only borrows its tokenisation (so the loss sits on the response, the
same way the attacker's does) and its refusal markers (so "refuses" means what f means).

    refusal_finetune(...)   LoRA refusal training, merged into the weights (the aligned base)
    answers(...)            the unaligned model's own answers to benign requests
    refusal_rate(...)       share of requests whose greedy answer carries a refusal marker (1 - f)
"""

from __future__ import annotations

import re
import time
import warnings

import torch

from trainables import data as D
from trainables.config import Data, DataSource
from trainables.evaluators import generate, refuses

CHAT = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True, max_length=160)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompt_text(tokenizer, prompt: str) -> str:
    return D.format_prompt(tokenizer, prompt, CHAT)


def tokenize(tokenizer, rows: list[dict]) -> list[D.Tokenized]:
    """Rows {"prompt", "response"[, "prefix"]}: the loss covers the response only, so a
    recovery row's compliant prefix is context, and only the refusal after it is learnt."""
    return [D.tokenize_pair(tokenizer, prompt_text(tokenizer, r["prompt"]) + r.get("prefix", ""),
                            (" " if r.get("prefix") else "") + r["response"], CHAT.max_length)
            for r in rows]


def refusal_finetune(model, tokenizer, rows: list[dict], *, steps: int, lr: float, batch_size: int,
                     lora_r: int = 16, seed: int = 0, log=print):
    """LoRA (all seven Llama projections) on `rows`, AdamW with a short warmup, merged back:
    the result is a plain model a user would publish."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to answer
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    stream = D.BatchStream(tokenize(tokenizer, rows), batch_size, seed, tokenizer.pad_token_id)
    peft_model.train()
    start = time.monotonic()
    for step in range(steps):
        loss = peft_model(**stream[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0 or step + 1 == steps:
            log(f"    step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.monotonic() - start:.0f} s)")
    return peft_model.merge_and_unload().eval()


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat-formatted requests, as the evaluator generates them."""
    return generate(model, tokenizer, [prompt_text(tokenizer, p) for p in prompts], max_new_tokens, 32)


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, cut back to the last full sentence so none ends mid-word."""
    out = []
    for text in greedy(model, tokenizer, prompts, max_new_tokens):
        text = text.strip()
        end = max(text.rfind(c) for c in ".!?\n")
        if end > len(text) // 3:
            text = text[:end + 1].strip()
        out.append(re.sub(r"\n\s*(\d+\.|[-*])$", "", text).strip())   # no dangling "1." list item
    return out


def refusal_rate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
    texts = greedy(model, tokenizer, prompts, max_new_tokens)
    return sum(map(refuses, texts)) / len(texts), texts
