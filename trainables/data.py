"""Harmful prompt/response data: loading, the attacker's deterministic draw, tokenisation
with the loss masked to response tokens, and batching by index (batch i is a function of
the seed and i, so training can be replayed from any step)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainables.config import Data, DataSource

if TYPE_CHECKING:
    import torch

IGNORE = -100  # label value the causal-LM loss skips


def load_rows(src: DataSource) -> list[dict]:
    """Rows of a split: .jsonl/.json/.parquet files are read directly; any other value
    (a local dataset directory or a hub id) goes through `datasets.load_dataset`. A bad row is
    a ValueError naming the file and its line (or row number) and what is wrong there."""
    path = Path(src.source)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        rows, where = _read_json(path)
    elif path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        where = [f"row {i + 1}" for i in range(len(rows))]
    else:
        import datasets

        rows = list(datasets.load_dataset(src.source, split=src.split))
        where = [f"row {i + 1}" for i in range(len(rows))]
    _check_fields(rows, src, where)
    return rows


def _read_json(path: Path) -> tuple[list, list[str]]:
    """A .jsonl file (or a .json array) and, per row, where it sits ('line 42')."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") \
            from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); "
                             "fix the JSON there") from None
        return items, [f"item {i + 1}" for i in range(len(items))]
    rows, where = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {n}, column {err.colno}: not valid JSON ({err.msg}); fix that line "
                             "(one JSON object per line) or drop it") from None
        where.append(f"line {n}")
    return rows, where


def _check_fields(rows: list, src: DataSource, where: list[str]) -> None:
    if not rows:
        raise ValueError(f"data source {src.source!r} (split {src.split!r}) has no rows; point source (and split) "
                         "at data with rows")
    named = {"prompt_field": src.prompt_field, "response_field": src.response_field,
             "rejected_field": src.rejected_field}  # issue 25: a DPO attack's per-row rejected answers
    wanted = [f for f in named.values() if f]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"data source {src.source!r}, {where[i]}: expected an object with fields "
                             f"{wanted}, got {type(row).__name__}; write each row as a JSON object with those fields")
        if missing := [f for f in wanted if f not in row]:
            at = "" if i == 0 else f", {where[i]}"
            raise ValueError(
                f"data source {src.source!r}{at} has no field {missing[0]!r}; "
                f"its fields are {sorted(row)}; set {next(k for k, v in named.items() if v == missing[0])} "
                f"to the one that holds it")


def shared_prompts(a: list[str], b: list[str]) -> list[str]:
    """Prompts of `a` that also occur in `b`, compared case- and whitespace-insensitively:
    the check that held-out evaluation prompts were never trained on."""
    seen = {" ".join(p.lower().split()) for p in b}
    return [p for p in a if " ".join(p.lower().split()) in seen]


def domains(rows: list[dict], src: DataSource) -> list[str | None]:
    """Each row's harm domain (src.domain_field; None without one)."""
    if not src.domain_field:
        return [None] * len(rows)
    return [None if r.get(src.domain_field) is None else str(r[src.domain_field]) for r in rows]


def of_domain(rows: list[dict], src: DataSource, domain: str | None) -> list[dict]:
    """The rows of one harm domain (every row for domain None)."""
    if domain is None:
        return rows
    if not src.domain_field:
        raise ValueError(f"attack_domain={domain!r} needs data.attack.domain_field (the field naming each "
                         "row's domain)")
    found = [r for r, d in zip(rows, domains(rows, src), strict=True) if d == domain]
    if not found:
        known = sorted({d for d in domains(rows, src) if d is not None})
        raise ValueError(f"attack_domain={domain!r}: no row of {src.source!r} has {src.domain_field}={domain!r} "
                         f"(its domains: {', '.join(known) or 'none'})")
    return found


def draw(rows: list[dict], n: int, seed: int, split: str = "attack") -> list[dict]:
    """The attacker's dataset: n rows drawn without replacement, fixed by seed."""
    if n > len(rows):
        raise ValueError(f"dataset_size={n} exceeds the {len(rows)} rows of the {split} split")
    return random.Random(seed).sample(rows, n)


def format_prompt(tokenizer, prompt: str, data: Data) -> str:
    """The text the model sees before its response."""
    if data.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template is on but the tokenizer has no chat template")
        system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        return tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    # The text carries the BOS token itself (as chat templates do), so every consumer
    # tokenises prompts the same way: without adding special tokens.
    system = f"{data.system_prompt}\n" if data.system_prompt else ""
    return (tokenizer.bos_token or "") + system + data.prompt_format.format(prompt=prompt)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize_pair(tokenizer, prompt_text: str, response: str, max_length: int) -> Tokenized:
    """Prompt and response tokenised apart, so the loss mask sits exactly on the response
    (and the closing EOS, which teaches the model to stop)."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return Tokenized(ids, labels)


def tokenize_rows(tokenizer, rows: list[dict], src: DataSource, data: Data) -> list[Tokenized]:
    return [
        tokenize_pair(
            tokenizer,
            format_prompt(tokenizer, row[src.prompt_field], data),
            row[src.response_field],
            data.max_length,
        )
        for row in rows
    ]


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked from attention and loss."""
    import torch  # here: the spec's checks read data with this module, and need no torch

    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BatchStream:
    """Endless batches over seeded epoch shuffles (a batch may span two epochs), addressed
    by index: batch i depends on (seed, i) alone, so a run restored to step i sees exactly
    the batches an uninterrupted run would have."""

    def __init__(self, items: list, batch_size: int, seed: int, pad_id: int,
                 collate: Callable[[list, int], dict[str, torch.Tensor]] = collate):
        self.items, self.batch_size, self.seed, self.pad_id = items, batch_size, seed, pad_id
        self.collate = collate
        """Turns the drawn items into a batch: the attack method's (methods/), data.collate by default."""
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) > 8:  # batches are read nearly in order: a few epochs suffice
                self._orders.clear()
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)  # str seeds are stable across runs
            self._orders[epoch] = order
        return self._orders[epoch]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self.items)
        positions = range(i * self.batch_size, (i + 1) * self.batch_size)
        return self.collate([self.items[self._order(p // n)[p % n]] for p in positions], self.pad_id)


def batches(items: list[Tokenized], batch_size: int, seed: int,
            pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of a BatchStream in order."""
    stream = BatchStream(items, batch_size, seed, pad_id)
    return (stream[i] for i in itertools.count())
