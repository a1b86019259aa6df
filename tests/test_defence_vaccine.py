"""Vaccine as a defence method (trainables/defences/vaccine.py): the attention-output gradients against
autograd, the global norm, and the gradient step() leaves against a float64 re-derivation run one
sequence at a time with its own hooks, under full fine-tuning and LoRA; the terms, the budget, the
streams and the options."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from trainables import data as D
from trainables.attacker import Attacker
from trainables.checkpoint import load_model, load_tokenizer, make_trainable
from trainables.config import Checkpoint, Data, DataSource
from trainables.defences.vaccine import Options, Vaccine, perturbations, recorded_attention_grads
from trainables.methods.base import Rates

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
RATES = Rates(train=7, forward=2)
DATA = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)


def rows_of(world, name: str, n: int) -> list[dict]:
    lines = (world / f"{name}.jsonl").read_text().splitlines()[:n]
    return [{"prompt": r["prompt"], "response": r["response"]} for r in map(json.loads, lines)]


def attention_modules(model):
    """The self-attention modules, found here on their own (not with the code under test)."""
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return [layer.self_attn for layer in inner.model.layers]


def setup(world, finetune="full", **options):
    """A trainable toy model nudged off its aligned optimum (so every loss and gradient is far from
    zero), the method, and one batch of 2 refusals and 1 benign row of unequal lengths (padding)."""
    ckpt = Checkpoint(model=str(world / "base"))
    tok = load_tokenizer(ckpt)
    model, _ = make_trainable(load_model(ckpt, CPU), Attacker(finetune=finetune, lora_r=4, lora_alpha=8.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA's B starts at 0: without this its A would get no gradient
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    method = Vaccine(Options(**options), model, RATES, seed=0)
    rows = {"refusal": rows_of(world, "align_harmful", 2), "benign": rows_of(world, "benign", 1)}
    items = method.streams(rows, tok, DATA)["align"]
    assert len({len(t.input_ids) for t in items}) > 1, "the batch should carry padding"
    batch = method.collate("align", items, tok.pad_token_id)

    def draw(stream, i):
        assert (stream, i) == ("align", 5)
        return batch

    return model, method, items, batch, draw


def token_losses(model, t: D.Tokenized) -> torch.Tensor:
    """One sequence alone (no padding), float64: the summed -log p of its supervised tokens."""
    logits = model(input_ids=torch.tensor([t.input_ids])).logits[0].double()
    total = torch.zeros((), dtype=torch.float64)
    for j in range(1, len(t.input_ids)):
        if t.labels[j] != D.IGNORE:
            total = total - torch.log_softmax(logits[j - 1], -1)[t.labels[j]]
    return total


def by_hand(model, items, rho: float) -> dict:
    """Vaccine re-derived on a float64 copy, one sequence at a time: g_l[b] = d(CE)/d(a_l[b]) with
    autograd.grad on the captured attention outputs; eps = rho g / (sqrt(sum_l,b |g_l[b]|^2) + 1e-7);
    then each sequence again with eps added by a hook of this file, its CE's gradient accumulated."""
    ref = copy.deepcopy(model).double()
    attn = attention_modules(ref)
    count = sum(1 for t in items for label in t.labels[1:] if label != D.IGNORE)

    def run(t, shift=None):
        captured = []

        def hook_for(layer):
            def hook(module, args, output):
                out = output[0] if shift is None else output[0] + shift[layer]
                captured.append(out)
                return (out, *output[1:])
            return hook

        handles = [a.register_forward_hook(hook_for(i)) for i, a in enumerate(attn)]
        try:
            return token_losses(ref, t) / count, captured
        finally:
            for h in handles:
                h.remove()

    ce, g = 0.0, []
    for t in items:
        loss, captured = run(t)
        g.append(torch.autograd.grad(loss, captured))
        ce += loss.item()
    norm = sum(float((g_bl ** 2).sum()) for g_b in g for g_bl in g_b) ** 0.5
    ref.zero_grad(set_to_none=True)
    perturbed = 0.0
    for t, g_b in zip(items, g, strict=True):
        loss, _ = run(t, shift=[rho * g_bl / (norm + 1e-7) for g_bl in g_b])
        loss.backward()
        perturbed += loss.item()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    return {"align_ce": ce, "perturbed_ce": perturbed, "norm": norm, "g": g, "grads": grads}


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-4) -> bool:
    return float((got.double() - want).norm()) <= rtol * float(want.norm()) + 1e-12


def test_recorded_gradients_are_the_attention_outputs_gradients(world):
    model, method, items, batch, _ = setup(world)
    captured = []
    handles = [a.register_forward_hook(lambda m, a, o: captured.append(o[0])) for a in attention_modules(model)]
    loss = model(**batch).loss
    for h in handles:
        h.remove()
    want = torch.autograd.grad(loss, captured)
    with recorded_attention_grads(method.layers) as got:
        model(**batch).loss.backward()
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (3, batch["input_ids"].shape[1], 64)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)
    # and against the float64 one-sequence-at-a-time derivation: padding positions get none
    hand = by_hand(model, items, 2.0)
    for b, t in enumerate(items):
        n = len(t.input_ids)
        for layer in range(2):
            assert close(got[layer][b, :n], hand["g"][b][layer][0], rtol=1e-4)
            assert float(got[layer][b, n:].abs().sum()) == 0.0



def test_an_attention_output_below_every_adapter_still_gets_its_gradient(world):
    # LoRA on the MLPs alone: layer 0's attention output needs no gradient, yet eps_0 is read from it.
    # Its B starts at 0, so the function is the base model's: full fine-tuning gives the same g_l.
    ckpt = Checkpoint(model=str(world / "base"))
    tok = load_tokenizer(ckpt)
    full, _ = make_trainable(load_model(ckpt, CPU), Attacker(finetune="full"))
    mlp_only, _ = make_trainable(load_model(ckpt, CPU), Attacker(finetune="lora", lora_target_modules=["down_proj"]))
    method = Vaccine(Options(), mlp_only, RATES, 0)
    batch = method.collate("align", method.streams({"refusal": rows_of(world, "align_harmful", 2)}, tok, DATA)["align"],
                           tok.pad_token_id)
    captured = []
    handles = [a.register_forward_hook(lambda m, a, o: captured.append(o[0])) for a in attention_modules(full)]
    want = torch.autograd.grad(full(**batch).loss, captured)
    for h in handles:
        h.remove()
    with recorded_attention_grads(method.layers) as got:
        mlp_only(**batch).loss.backward()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)
    step = method.step(mlp_only, lambda stream, i: batch, 0)
    assert step.terms["perturbed_ce"] > step.terms["align_ce"]

@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_step_leaves_the_perturbed_gradient_and_its_terms(world, finetune):
    model, method, items, batch, draw = setup(world, finetune)
    hand = by_hand(model, items, 2.0)
    step = method.step(model, draw, 5)
    assert step.terms.keys() == {"align_ce", "perturbed_ce", "loss", "perturbation_norm"}
    assert step.terms["align_ce"] == pytest.approx(hand["align_ce"], rel=1e-5)
    assert step.terms["perturbed_ce"] == pytest.approx(hand["perturbed_ce"], rel=1e-5)
    assert step.terms["loss"] == step.terms["perturbed_ce"]
    assert step.terms["perturbation_norm"] == pytest.approx(hand["norm"], rel=1e-4)
    # eps points up the loss: the shifted pass's loss is the higher, and by a margin the tolerances can't hide
    assert step.terms["perturbed_ce"] > step.terms["align_ce"] * 1.01
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == hand["grads"].keys()
    for name, p in trained.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        assert close(p.grad, hand["grads"][name]), name
    if finetune == "lora":
        assert all("lora_" in n for n in trained)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # the shift matters: the gradient differs from the unperturbed one by far more than the tolerance
    plain = by_hand(model, items, 0.0)["grads"]
    moved = sum(float((hand["grads"][n] - plain[n]).norm() ** 2) for n in trained) ** 0.5
    assert moved > 0.01 * sum(float(plain[n].norm() ** 2) for n in trained) ** 0.5


def test_rho_zero_is_plain_sft(world):
    model, method, _, batch, draw = setup(world, rho=0.0)
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    plain = twin(**batch).loss
    plain.backward()
    step = method.step(model, draw, 5)
    assert step.terms["loss"] == pytest.approx(plain.item(), rel=1e-6)
    assert step.terms["align_ce"] == pytest.approx(plain.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)


def test_the_norm_is_one_over_all_layers():
    # unequal layers: a per-layer norm would give both a shift of length rho
    g = [torch.full((2, 3, 4), 3.0), torch.full((2, 3, 4), 4.0)]
    eps = perturbations(g, 2.0)
    whole = (24 * 9 + 24 * 16) ** 0.5
    for e, v in zip(eps, (3.0, 4.0), strict=True):
        torch.testing.assert_close(e, torch.full((2, 3, 4), 2.0 * v / (whole + 1e-7)))
    assert float(sum((e ** 2).sum() for e in eps)) ** 0.5 == pytest.approx(2.0, rel=1e-6)
    assert not eps[0].requires_grad


def test_a_zero_gradient_gives_a_zero_shift():
    eps = perturbations([torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)], 2.0)
    assert all(torch.equal(e, torch.zeros(1, 2, 3)) for e in eps)


def test_spent_two_passes_over_the_unpadded_tokens(world):
    model, method, items, _, draw = setup(world)
    step = method.step(model, draw, 5)
    supervised = sum(1 for t in items for label in t.labels[1:] if label != D.IGNORE)  # read by the shifted loss
    processed = sum(len(t.input_ids) for t in items)
    assert step.spent.examples == 3
    assert step.spent.tokens == supervised
    assert step.spent.flops == 2 * processed * RATES.train
    assert step.spent.generated == 0


def test_streams_are_the_refusals_then_the_benign_rows(world):
    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    model = load_model(Checkpoint(model=str(world / "base")), CPU)
    method = Vaccine(Options(), model, RATES, 0)
    refusal, benign = rows_of(world, "align_harmful", 2), rows_of(world, "benign", 2)
    items = method.streams({"refusal": refusal, "benign": benign, "harmful": rows_of(world, "attack", 2)},
                           tok, DATA)
    assert list(items) == ["align"]
    want = [D.tokenize_pair(tok, D.format_prompt(tok, r["prompt"], DATA), r["response"], DATA.max_length)
            for r in refusal + benign]
    assert items["align"] == want
    assert method.streams({"refusal": refusal}, tok, DATA)["align"] == want[:2]
    with pytest.raises(ValueError, match="refusal rows"):
        method.streams({"benign": benign}, tok, DATA)
    with pytest.raises(ValueError, match="refusal rows"):
        method.streams({"refusal": [], "benign": benign}, tok, DATA)
    with pytest.raises(ValueError, match="benign row 1 has no text field 'response'"):
        method.streams({"refusal": refusal, "benign": [benign[0], {"prompt": "x"}]}, tok, DATA)
    short = DATA.model_copy(update={"max_length": 3})
    with pytest.raises(ValueError, match="refusal row 0.*max_length=3"):
        method.streams({"refusal": refusal}, tok, short)
    with pytest.raises(ValueError, match="one stream"):
        method.collate("harmful", want, tok.pad_token_id)


def test_options_and_class_facts():
    assert Options().rho == 2.0
    assert Options(rho=0).rho == 0.0
    for bad in ({"rho": -0.1}, {"rho": float("nan")}, {"beta": 1.0}):
        with pytest.raises(ValidationError):
            Options(**bad)
    assert (Vaccine.name, Vaccine.Options, Vaccine.needs, Vaccine.uses, Vaccine.official_finetune) == (
        "vaccine", Options, ("refusal",), ("refusal", "benign"), "lora")
