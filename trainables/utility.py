"""Utility u: how well the attacked model still does benign work, scored on held-out benign
prompts at every evaluation point beside f. The utility bound (config.Utility) compares u at
a crossing of phi with u at step 0: a crossing with u below u0 - epsilon is `degenerate`."""

from __future__ import annotations

from collections.abc import Callable

from trainables import data as D
from trainables.config import Data, Utility
from trainables.evaluators import EvalItem, generate, refuses
from trainables.evaluators.base import items_of
from trainables.evaluators.nll import answer_probability


def utility_items(cfg: Utility, tokenizer, data: Data) -> list[EvalItem]:
    return items_of(D.load_rows(cfg.data)[: cfg.size], cfg.data, tokenizer, data)


def make_utility(cfg: Utility, tokenizer, data: Data, synced_generation: bool = False
                 ) -> Callable[[object], float]:
    """u(model) for this trial's utility block."""
    items = utility_items(cfg, tokenizer, data)

    def score(model) -> float:
        if cfg.score == "answer_probability":
            return answer_probability(model, tokenizer, items, cfg.batch_size, data.max_length)[0]
        answers = generate(model, tokenizer, [it.prompt for it in items], cfg.max_new_tokens, cfg.batch_size,
                           synced_generation)
        return sum(not refuses(a) for a in answers) / len(answers)

    return score
