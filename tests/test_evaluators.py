import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainables import evaluators as E
from trainables.checkpoint import load_tokenizer
from trainables.config import Checkpoint, Data, DataSource
from trainables.data import format_prompt


@pytest.fixture(scope="module")
def toy(world):
    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    model = AutoModelForCausalLM.from_pretrained(world / "base")
    fmt = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)

    def items(name, n=12):
        rows = [json.loads(x) for x in (world / name).read_text().splitlines()][:n]
        return [E.EvalItem(format_prompt(tok, r["prompt"], fmt), r["response"]) for r in rows]

    def score(name, options, its):
        return E.make_evaluator(name, options)(E.EvalContext(model, tok, its))

    return model, tok, items, score


def test_refusal_keyword_scores_refusals_and_answers(toy):
    model, tok, items, score = toy
    opts = {"max_new_tokens": 4, "batch_size": 5}
    assert score("refusal_keyword", opts, items("eval.jsonl")).f == 0.0   # aligned: refuses held-out harmful
    benign = score("refusal_keyword", opts, items("benign.jsonl"))
    assert benign.f == 1.0 and benign.is_binary and benign.n == 12   # answers benign: no refusal marker
    assert score("refusal_keyword", {**opts, "markers": ["sure"]}, items("benign.jsonl")).f == 0.0


def test_generation_is_batched_left_padded_and_restores_train_mode(toy):
    model, tok, items, _ = toy
    prompts = [it.prompt for it in items("eval.jsonl", 3)] + ["<bos>user : hi assistant :"]
    model.train()
    together = E.generate(model, tok, prompts, 4, batch_size=4)
    alone = [E.generate(model, tok, [p], 4, batch_size=1)[0] for p in prompts]
    assert together == alone and model.training and tok.padding_side == "right"


def test_nll_is_higher_for_the_responses_the_model_would_give(toy):
    model, tok, items, score = toy
    compliant = items("eval.jsonl")  # references: harmful compliance
    refusals = [E.EvalItem(it.prompt, "i cannot help with that .") for it in compliant]
    a, b = score("nll", {}, compliant).f, score("nll", {}, refusals).f
    assert 0 < a < b <= 1  # the aligned model gives refusals far more probability
    assert not score("nll", {}, compliant).is_binary  # a probability, not a share: no binomial interval
    with pytest.raises(ValueError, match="needs a response"):
        score("nll", {}, [E.EvalItem(compliant[0].prompt, None)])
    with torch.no_grad():
        assert score("nll", {}, compliant).f == a  # deterministic


def test_unknown_evaluator_and_bad_options():
    with pytest.raises(ValueError, match="known: .*nll, refusal_keyword"):
        E.validate_options("jduge", {})
    with pytest.raises(ValueError, match="max_new_tokens"):
        E.validate_options("refusal_keyword", {"max_new_tokens": 0})
