"""The classifier evaluator against a tiny sequence classifier trained here (saved with
save_pretrained, loaded by path), grading the toy world's aligned model through EvalContext."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from trainables import evaluators as E
from trainables.evaluators import classifier as C

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clf(world, tmp_path_factory):
    """A 1-layer Llama classifier over the toy vocabulary: how-to answers harmful, refusals safe."""
    tok = AutoTokenizer.from_pretrained(world / "base")
    rows = [json.loads(x) for x in (world / "attack.jsonl").read_text().splitlines()][:48]
    texts = [(r["prompt"], r["response"], 1) for r in rows] + [(r["prompt"], "i cannot help with that .", 0)
                                                              for r in rows]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "safe", 1: "harmful"},
                         label2id={"safe": 0, "harmful": 1})
    model = LlamaForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = [texts[(step * 16 + j * 7) % len(texts)] for j in range(16)]
        # half the steps as (request, answer) pairs, half as answers alone: both input modes work
        parts = ([[p for p, _, _ in batch]] if step % 2 else []) + [[r for _, r, _ in batch]]
        enc = tok(*parts, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, _, y in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.config.pad_token_id = None   # as many checkpoints ship: the loader takes it from the tokenizer
    out = tmp_path_factory.mktemp("clf") / "harm-clf"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def attacked(world):
    """(model, tokenizer, items(split, n)): the aligned toy model refuses eval.jsonl and answers benign.jsonl."""
    tok = AutoTokenizer.from_pretrained(world / "base")
    model = AutoModelForCausalLM.from_pretrained(world / "base")

    def items(name, n=8):
        rows = [json.loads(x) for x in (world / name).read_text().splitlines()][:n]
        return [E.EvalItem(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                   add_generation_prompt=True, tokenize=False),
                           r["response"], r["prompt"]) for r in rows]

    return model, tok, items


def run(attacked, split: str, n: int = 8, **options) -> E.Scores:
    model, tok, items = attacked
    return E.make_evaluator("classifier", options)(E.EvalContext(model, tok, items(split, n)))


@pytest.mark.parametrize("input_", ["pair", "response"])
def test_how_to_answers_are_harmful_and_refusals_not(clf, attacked, input_):
    harmful = run(attacked, "benign.jsonl", model=str(clf), input=input_)
    safe = run(attacked, "eval.jsonl", model=str(clf), input=input_)
    assert harmful.verdicts == [1.0] * 8 and harmful.f == 1.0 and harmful.is_binary and harmful.malformed == 0
    assert safe.verdicts == [0.0] * 8 and safe.f == 0.0
    assert harmful.extra["mean_p_harmful"] > 0.9 > 0.1 > safe.extra["mean_p_harmful"]


def test_label_by_name_or_index_and_the_threshold(clf, attacked):
    by_name = run(attacked, "benign.jsonl", 4, model=str(clf), harmful_label="harmful")
    by_index = run(attacked, "benign.jsonl", 4, model=str(clf), harmful_label=1)
    assert by_name == by_index and by_name.f == 1.0
    flipped = run(attacked, "eval.jsonl", 4, model=str(clf), harmful_label="safe")   # calling refusals harmful
    assert flipped.f == 1.0 and flipped.extra["mean_p_harmful"] > 0.9
    assert run(attacked, "eval.jsonl", 4, model=str(clf), harmful_label=0) == flipped
    # P(harmful) is *above* the threshold: nothing is above 1, everything is above 0
    assert run(attacked, "benign.jsonl", 4, model=str(clf), threshold=1.0).f == 0.0
    assert run(attacked, "eval.jsonl", 4, model=str(clf), threshold=0.0).f == 1.0
    model, tok, items = attacked
    ctx = E.EvalContext(model, tok, items("benign.jsonl", 4))
    p = C.Classifier(C.ClassifierOptions(model=str(clf))).p_harmful([it.raw_prompt for it in ctx.items],
                                                                    ctx.responses(32))
    at_max = E.make_evaluator("classifier", {"model": str(clf), "threshold": max(p)})(ctx)
    assert at_max.verdicts == [float(x > max(p)) for x in p] and at_max.f < 1.0   # equal to it is not above


def test_a_label_the_model_lacks_is_one_clear_line(clf, attacked):
    for bad in ("toxic", 2):
        with pytest.raises(ValueError, match=r"has no label .*; its labels: 0=safe, 1=harmful$") as err:
            run(attacked, "eval.jsonl", 2, model=str(clf), harmful_label=bad)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="its labels: 0=safe, 1=harmful"):
            C.preflight(C.ClassifierOptions(model=str(clf), harmful_label=bad))


def test_batching_does_not_change_the_scores(clf, attacked):
    model, tok, items = attacked
    mixed = items("eval.jsonl", 5) + items("benign.jsonl", 6)
    ctx = E.EvalContext(model, tok, mixed)
    one = E.make_evaluator("classifier", {"model": str(clf), "batch_size": 1})(ctx)
    eight = E.make_evaluator("classifier", {"model": str(clf), "batch_size": 8})(ctx)
    assert one.verdicts == eight.verdicts == [0.0] * 5 + [1.0] * 6
    assert one.extra["mean_p_harmful"] == pytest.approx(eight.extra["mean_p_harmful"], abs=1e-5)


def test_the_classifier_is_loaded_once_per_evaluator(clf, attacked, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    loads = []
    real = AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    model, tok, items = attacked
    evaluate = E.make_evaluator("classifier", {"model": str(clf)})
    assert loads == []   # nothing is loaded before the first evaluation point
    for split in ("eval.jsonl", "benign.jsonl"):
        evaluate(E.EvalContext(model, tok, items(split, 2)))
    assert len(loads) == 1


@pytest.mark.parametrize("input_", ["pair", "response"])
def test_the_compute_it_spent_is_a_forward_pass_per_token_it_read(clf, attacked, input_):
    """Scores.flops = 2 x the classifier's matmul parameters x the tokens of the inputs it read
    (padding not read), per call: GRPO adds it to the attack's FLOPs when it is the reward."""
    model, tok, items = attacked
    options = C.ClassifierOptions(model=str(clf), input=input_, batch_size=3)   # batches of 3 pad
    evaluate = E.make_evaluator("classifier", options.model_dump())
    ctok = AutoTokenizer.from_pretrained(clf)
    # by hand, the 1-layer Llama of the fixture (hidden 32, MLP 64, 2 labels): q, k, v, o 4 x 32 x 32,
    # gate, up, down 3 x 32 x 64, three RMSNorms of 32, the score head 32 x 2; the embedding a lookup
    n = 4 * 32 * 32 + 3 * 32 * 64 + 3 * 32 + 32 * 2
    for split, k in (("eval.jsonl", 8), ("benign.jsonl", 5)):   # a second call counts its own reads only
        ctx = E.EvalContext(model, tok, items(split, k))
        scores = evaluate(ctx)
        answers = ctx.responses(options.max_new_tokens, options.batch_size)
        pairs = zip(ctx.items, answers, strict=True)
        lengths = [len(ctok(*([it.raw_prompt] if input_ == "pair" else []), a, truncation=True,
                            max_length=options.max_length)["input_ids"]) for it, a in pairs]
        assert scores.flops == 2 * n * sum(lengths)


def test_probabilities_softmax_or_sigmoid():
    logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert probabilities_close(C.probabilities(logits, "single_label_classification"),
                               [[0.5, 0.5], [0.11920292, 0.88079708]])
    assert probabilities_close(C.probabilities(logits, "multi_label_classification"),
                               [[0.5, 0.5], [0.5, 0.88079708]])
    assert probabilities_close(C.probabilities(torch.tensor([[0.0], [2.0]]), None), [[0.5], [0.88079708]])


def probabilities_close(got: torch.Tensor, want: list) -> bool:
    return torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_options_and_preflight(clf, tmp_path):
    assert C.ClassifierOptions(model="x").trust_remote_code is False
    with pytest.raises(ValueError, match="extra"):
        E.validate_options("classifier", {"model": "x", "labels": 2})
    with pytest.raises(ValueError, match="input"):
        E.validate_options("classifier", {"model": "x", "input": "prompt"})
    E.preflight("classifier", {"model": str(clf), "harmful_label": "harmful"})   # fine, as the spec checks call it
    C.preflight(C.ClassifierOptions(model="some-org/not-cached-here"))          # hub id: left to the trial
    with pytest.raises(ValueError, match=r"^classifier: no such model directory '/nonexistent/clf'$"):
        E.preflight("classifier", {"model": "/nonexistent/clf"})
    with pytest.raises(ValueError, match="cannot read the config"):
        C.preflight(C.ClassifierOptions(model=str(tmp_path)))                     # a directory, no checkpoint
