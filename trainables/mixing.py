"""The attacker's own training rows: a poison mix of attack and benign rows, a backdoor trigger
on the attack rows, and the prompt format the attacker trains with (docs/data-attacks.md)."""

from __future__ import annotations

import random

from trainables.attacker import Attacker
from trainables.config import Data, DataSource
from trainables.data import draw

TEMPLATE_FIELDS = ("chat_template", "prompt_format", "system_prompt")
"""Attacker fields that replace data's own (null: the spec's) on the attacker's training rows."""


def with_trigger(prompt: str, trigger: str | None) -> str:
    """A prompt with the backdoor trigger and a space before it (unchanged without one)."""
    return prompt if trigger is None else f"{trigger} {prompt}"


def poison_counts(n: int, ratio: float | None) -> tuple[int, int]:
    """(attack rows, benign rows) of an n-row dataset: all attack rows without a ratio, else
    max(1, round(ratio x n)) attack rows (Python's round: half to even) and the rest benign."""
    if ratio is None:
        return n, 0
    k = min(n, max(1, round(ratio * n)))
    return k, n - k


def attacker_rows(attack: list[dict], benign: list[dict] | None, atk: Attacker, src: DataSource,
                  benign_src: DataSource | None, split: str = "attack") -> list[dict]:
    """The rows one attack stage trains on: its attack rows drawn by `seed` (the trigger before
    their prompts), and with a poison_ratio benign rows drawn beside them, shuffled together by
    `seed`. Rows come back in the attack split's field names (prompt_field, response_field)."""
    k, m = poison_counts(atk.dataset_size, atk.poison_ratio)
    rows = [{**r, src.prompt_field: with_trigger(r[src.prompt_field], atk.trigger)}
            for r in draw(attack, k, atk.seed, split)]
    if m == 0:
        return rows
    if benign is None or benign_src is None:
        raise ValueError("attacker.poison_ratio needs data.benign (the benign rows of the mix)")
    rows += [{src.prompt_field: r[benign_src.prompt_field], src.response_field: r[benign_src.response_field]}
             for r in draw(benign, m, atk.seed, "benign")]
    random.Random(f"{atk.seed}/poison").shuffle(rows)  # str seeds are stable across runs
    return rows


def attacker_format(data: Data, atk: Attacker) -> Data:
    """The prompt format of the attacker's training rows: data's, with the attacker's
    chat_template, prompt_format and system_prompt where set. The evaluation keeps data's."""
    return data.model_copy(update={f: getattr(atk, f) for f in TEMPLATE_FIELDS if getattr(atk, f) is not None})
