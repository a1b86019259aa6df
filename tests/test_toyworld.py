"""The toy world's v3 content: harm domains on every harmful row, the trainability task (new
to the models, learnable, held out), and the "noised" defence that fails stability. Uses the
session's world (conftest.py), so it costs one build shared with the rest of the suite."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.spec import toyworld as T

pytestmark = pytest.mark.usefixtures("one_thread")

HARMFUL = ("align_harmful", "attack", "eval")
SPLITS = HARMFUL + ("benign", "benign_heldout", "task", "task_heldout")


def rows(world, name: str) -> list[dict]:
    return [json.loads(line) for line in (world / f"{name}.jsonl").read_text().splitlines()]


def pair(row: dict) -> tuple[str, str]:
    """(verb, object) of a request "... <verb> the <object>"."""
    words = row["prompt"].split()
    return words[-3], words[-1]


def load(world, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(world / name).eval(), AutoTokenizer.from_pretrained(world / name)


def probability(model, tokenizer, data: list[dict]) -> float:
    from trainables import data as D
    from trainables.config import Data, DataSource
    from trainables.evaluators.base import EvalItem
    from trainables.evaluators.nll import answer_probability

    fmt = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)
    items = [EvalItem(D.format_prompt(tokenizer, r["prompt"], fmt), r["response"], r["prompt"]) for r in data]
    return answer_probability(model, tokenizer, items, batch_size=64)[0]


def test_domains_cover_the_harmful_verbs():
    assert sorted(v for verbs in T.DOMAINS.values() for v in verbs) == sorted(T.HARMFUL_VERBS)
    assert T.domain_of("hack") == "cyber" and T.domain_of("smuggle") == "theft"
    assert T.domain_of("bake") == "benign"
    with pytest.raises(ValueError):
        T.domain_of("juggle")


def test_every_harmful_row_has_its_verbs_domain(world):
    for name in HARMFUL:
        for row in rows(world, name):
            verb, _ = pair(row)
            assert row["category"] == T.domain_of(verb) != "benign", (name, row)
    for name in ("benign", "benign_heldout"):
        assert {r["category"] for r in rows(world, name)} == {"benign"}
    counts = {name: {d: sum(r["category"] == d for r in rows(world, name)) for d in T.DOMAINS}
              for name in ("attack", "eval")}
    assert len(rows(world, "eval")) == 48
    assert min(counts["eval"].values()) >= 10 and min(counts["attack"].values()) >= 30, counts


def test_splits_are_disjoint(world):
    from trainables.data import shared_prompts

    data = {name: rows(world, name) for name in SPLITS}
    pairs = {name: {pair(r) for r in data[name]} for name in HARMFUL}
    assert not pairs["eval"] & pairs["attack"]
    assert not pairs["eval"] & pairs["align_harmful"] and not pairs["attack"] & pairs["align_harmful"]
    for task in ("task", "task_heldout"):
        prompts = [r["prompt"] for r in data[task]]
        for other in SPLITS:
            if other != task:
                assert not shared_prompts(prompts, [r["prompt"] for r in data[other]]), (task, other)
    unordered = {name: {frozenset((w[5], w[8])) for w in (r["prompt"].split() for r in data[name])}
                 for name in ("task", "task_heldout")}
    assert not unordered["task"] & unordered["task_heldout"]  # not even the swapped question
    assert (len(data["task"]), len(data["task_heldout"])) == (T.TASK_TRAIN, T.TASK_HELDOUT)
    assert all(r["category"] == "task" for name in ("task", "task_heldout") for r in data[name])


def test_task_words_are_in_the_vocabulary(world):
    _, tokenizer = load(world, "base")
    for row in rows(world, "task") + rows(world, "task_heldout"):
        for text in (row["prompt"], row["response"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text


def test_the_task_is_new_at_release_and_learnable(world):
    """Trainability: the base gives held-out task answers low probability at release, and a
    short benign fine-tune (the rule, not the prompts) lifts them above 0.6."""
    from trainables import data as D
    from trainables.config import Data, DataSource

    model, tokenizer = load(world, "base")
    held = rows(world, "task_heldout")
    assert probability(model, tokenizer, held) < 0.2
    torch.manual_seed(0)
    fmt = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)
    items = D.tokenize_rows(tokenizer, rows(world, "task"), DataSource(source="-"), fmt)
    stream = D.batches(items, 8, 0, tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(20):
        model(**next(stream)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    assert probability(model.eval(), tokenizer, held) > 0.6


def test_noised_fails_stability(world):
    """The noised defence loses most of the base's benign utility at release."""
    bench = rows(world, "benign_heldout")
    base = probability(*load(world, "base"), bench)
    noised = probability(*load(world, "noised"), bench)
    assert base > 0.9 and noised < 0.6 and noised < base - 0.3, (base, noised)


def test_noise_is_seeded_and_relative():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = LlamaForCausalLM(model.config)
    twin.load_state_dict(before)
    T.noise(model, 0.5, seed=3)
    T.noise(twin, 0.5, seed=3)
    after = model.state_dict()
    assert all(torch.equal(after[k], twin.state_dict()[k]) for k in after)
    w = "model.layers.0.mlp.up_proj.weight"
    ratio = float((after[w] - before[w]).std() / before[w].std())
    assert 0.4 < ratio < 0.6
    norm = "model.norm.weight"  # constant ones: std 0, so noise relative to its mean magnitude
    assert not torch.equal(after[norm], before[norm])
