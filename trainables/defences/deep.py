"""Deep safety alignment by data augmentation (Qi et al. 2024, "Safety alignment should be made more
than just a few tokens deep"; Unispac/shallow-vs-deep-alignment @fb1749e).

Refusal fine-tuning in which, with probability `augment_probability`, an example is replaced by a
safety-recovery example: the harmful request, the first k tokens of a harmful answer to it (k
uniform in 1..max_prefix_tokens, at most the answer's length less one), then the refusal, the loss on
the refusal only. The model learns to turn back after a compliant start, which a prefilled or
fine-tuned compliant opening would otherwise carry on. Benign rows, when given, are mixed in as
they are (utility). The augmentation is drawn once per example (by seed), as the official code
builds its dataset once.

A refusal row recovers from the harmful answer of the harmful row with the same prompt; refusal
rows without one train as they are. The paper's token-wise constrained SFT is a fine-tuning-stage
objective the defender runs on the user's data; an attacker-controlled sweep has no such stage."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from trainables import data as D
from trainables.defences.base import Options as _Options
from trainables.defences.base import Role, Step
from trainables.methods.sft import spent, supervised_loss

if TYPE_CHECKING:
    import torch

    from trainables.config import Data
    from trainables.defences.base import Draw
    from trainables.methods.base import Rates


class Options(_Options):
    augment_probability: float = Field(0.5, ge=0, le=1)
    """Share of refusal examples (with a harmful answer to their prompt) made recovery examples
    (official 0.5)."""
    max_prefix_tokens: int = Field(100, ge=1)
    """The longest harmful opening before the refusal, in tokens (official 100); k is drawn
    uniformly from 1..min(this, the harmful answer's tokens less one)."""


def recovery_item(tokenizer, prompt_text: str, harmful: str, refusal: str, k: int, max_length: int) -> D.Tokenized:
    """The request, the first k tokens of the harmful answer (context, no loss), then the refusal
    and the end token (the loss)."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    opening = tokenizer(harmful, add_special_tokens=False)["input_ids"][:k]
    refusal_ids = tokenizer(" " + refusal.lstrip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        refusal_ids = refusal_ids + [tokenizer.eos_token_id]
    context = prompt_ids + opening
    return D.Tokenized((context + refusal_ids)[:max_length], ([D.IGNORE] * len(context) + refusal_ids)[:max_length])


class Deep:
    """Refusal fine-tuning with safety-recovery examples (the DefenceMethod protocol)."""

    name: ClassVar[str] = "deep"
    Options: ClassVar[type[Options]] = Options
    needs: ClassVar[tuple[Role, ...]] = ("refusal", "harmful")
    uses: ClassVar[tuple[Role, ...]] = ("refusal", "harmful", "benign")
    official_finetune: ClassVar[str] = "full"

    def __init__(self, options: Options, model: torch.nn.Module, rates: Rates, seed: int):
        self.options, self.rates, self.seed = options, rates, seed
        self.recovered = 0
        """How many refusal examples were made recovery examples (streams())."""

    def streams(self, rows: dict[Role, list[dict[str, str]]], tokenizer: Any, data: Data) -> dict[str, list]:
        harmful = {r["prompt"]: r["response"] for r in rows.get("harmful", [])}
        if not any(r["prompt"] in harmful for r in rows["refusal"]):
            raise ValueError("data: no refusal row shares its prompt with a harmful row; a recovery example needs "
                             "a harmful answer to the refused request (write both splits on the same prompts)")
        rng, items = random.Random(f"deep/{self.seed}"), []
        for r in rows["refusal"]:
            text = D.format_prompt(tokenizer, r["prompt"], data)
            answer = harmful.get(r["prompt"])
            if answer is not None and rng.random() < self.options.augment_probability:
                longest = min(self.options.max_prefix_tokens,
                              len(tokenizer(answer, add_special_tokens=False)["input_ids"]) - 1)
                if longest >= 1:
                    items.append(recovery_item(tokenizer, text, answer, r["response"], rng.randint(1, longest),
                                               data.max_length))
                    self.recovered += 1
                    continue
            items.append(D.tokenize_pair(tokenizer, text, r["response"], data.max_length))
        items += [D.tokenize_pair(tokenizer, D.format_prompt(tokenizer, r["prompt"], data), r["response"],
                                  data.max_length) for r in rows.get("benign", [])]
        return {"align": items}

    def collate(self, stream: str, items: list, pad_id: int) -> dict[str, torch.Tensor]:
        return D.collate(items, pad_id)

    def step(self, model: torch.nn.Module, draw: Draw, index: int) -> Step:
        batch = draw("align", index)
        loss = supervised_loss(model, batch, batch["input_ids"].device)
        loss.backward()
        return Step({"loss": float(loss.detach())}, spent(batch, self.rates.train))
