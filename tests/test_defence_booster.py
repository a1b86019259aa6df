"""Booster (trainables/defences/booster.py) against a hand computation on a tiny Llama in float64: the
gradient one step leaves (grad f + lamb * g - lamb * g', g and g' recomputed independently on a copy of the
weights with torch.func.functional_call, per sequence, explicit loops), each term, the global-norm
perturbation, the bit-exact restore, the budget counts, the options, LoRA and full."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.spec import toyworld
from trainables import data as D
from trainables.checkpoint import make_trainable
from trainables.config import Attacker, Data, DataSource
from trainables.defences import booster as B
from trainables.methods.base import Rates

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)
PAIRS = [("hack", "server"), ("poison", "cake"), ("steal", "wallet")]
PROMPTS = [p.format(v=v, o=o) for p, (v, o) in zip(toyworld.PHRASINGS, PAIRS, strict=True)]  # lengths differ
ROWS = {
    "refusal": [{"prompt": p, "response": toyworld.REFUSAL} for p in PROMPTS],
    "harmful": [{"prompt": p, "response": toyworld.how_to(v, o, manner)}
                for p, (v, o), manner in zip(PROMPTS, PAIRS, ["quietly", "quietly at night", "now"], strict=True)],
    "benign": [{"prompt": "tell me how to bake the cake", "response": toyworld.how_to("bake", "cake", "with care")}],
}
RATES = Rates(train=7, forward=3)
LORA = Attacker(finetune="lora", lora_r=2, lora_alpha=4.0, lora_target_modules=["q_proj", "k_proj", "v_proj"])


@pytest.fixture(scope="module")
def tok():
    return toyworld._build_tokenizer(None)


@pytest.fixture(scope="module")
def batches(tok):
    """The first batch of each stream: three refusals (the benign row left out) and three harmful answers."""
    rows = {k: v for k, v in ROWS.items() if k != "benign"}
    method = B.Booster(B.Options(), None, RATES, 0)
    streams = method.streams(rows, tok, DATA)
    return {s: method.collate(s, items, tok.pad_token_id) for s, items in streams.items()}


def tiny(tok, finetune: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).double()
    if finetune == "lora":
        model, _ = make_trainable(model, LORA)
        with torch.no_grad():  # LoRA's B starts at zero, where A gets no gradient: give every adapter one
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        model = model.double()
    else:
        model, _ = make_trainable(model, Attacker(finetune="full"))
    return model


def draw_from(batches):
    def draw(stream, i):
        assert i == 0
        return batches[stream]
    return draw


def run_step(tok, batches, finetune, **options):
    model = tiny(tok, finetune)
    method = B.Booster(B.Options(**options), model, RATES, 0)
    step = method.step(model, draw_from(batches), 0)
    return model, step


# --- the independent computation -------------------------------------------------------------------------

def hand_ce(model, params, batch) -> torch.Tensor:
    """Mean next-token CE over the batch's supervised tokens: each sequence alone (padding cut off), each
    position by hand."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        logits = functional_call(model, params, (), {"input_ids": batch["input_ids"][i:i + 1, :n]}).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        for t in range(n - 1):
            y = int(batch["labels"][i, t + 1])
            if y != D.IGNORE:
                total = total - logp[t, y]
                count += 1
    return total / count


def hand(model, batches, lamb, alpha):
    """f, h, h', g, g', the perturbation and the update, from a copy of the weights."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]

    def grad_at(point, batch):
        leaves = {n: point[n].clone().requires_grad_(True) for n in trained}
        loss = hand_ce(model, {**point, **leaves}, batch)
        grads = torch.autograd.grad(loss, [leaves[n] for n in trained])
        return float(loss.detach()), dict(zip(trained, grads, strict=True))

    h, g = grad_at(theta, batches["harmful"])
    norm = math.sqrt(sum(float((g[n] ** 2).sum()) for n in trained))
    shift = {n: -alpha * g[n] / (norm + 1e-7) for n in trained}
    h_after, g_after = grad_at({**theta, **{n: theta[n] + shift[n] for n in trained}}, batches["harmful"])
    f, gf = grad_at(theta, batches["refusal"])
    grad = {n: gf[n] + lamb * g[n] - lamb * g_after[n] for n in trained}
    return {"f": f, "h": h, "h_after": h_after, "g": g, "g_after": g_after, "gf": gf, "shift": shift,
            "grad": grad, "theta": theta, "trained": trained}


def close(a, b):
    """Equal to float32 precision relative to the tensor's scale: transformers' loss casts the float64
    logits to float32, the hand computation does not."""
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-12


# --- the step ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_and_terms_match_the_hand_computation(tok, batches, finetune):
    lamb, alpha = 2.5, 0.3
    want = hand(tiny(tok, finetune), batches, lamb, alpha)
    model, step = run_step(tok, batches, finetune, lamb=lamb, alpha=alpha)
    got = dict(model.named_parameters())
    assert sorted(n for n, p in got.items() if p.requires_grad) == sorted(want["trained"])
    for n in want["trained"]:
        assert close(got[n].grad, want["grad"][n]), n
    if finetune == "lora":
        assert all("lora_" in n for n in want["trained"])
        assert all(p.grad is None for p in got.values() if not p.requires_grad)
    # the lambda term moved the update away from plain SFT (else this test could not see its sign)
    assert max(float((want["grad"][n] - want["gf"][n]).abs().max()) for n in want["trained"]) > 1e-4
    t = step.terms
    assert set(t) == {"refusal_ce", "harmful_ce", "harmful_ce_after", "loss"}
    assert t["refusal_ce"] == pytest.approx(want["f"], rel=1e-6)
    assert t["harmful_ce"] == pytest.approx(want["h"], rel=1e-6)
    assert t["harmful_ce_after"] == pytest.approx(want["h_after"], rel=1e-6)
    assert t["harmful_ce_after"] < t["harmful_ce"]  # theta' is a descent step on h
    assert t["loss"] == pytest.approx(want["f"] + lamb * (want["h"] - want["h_after"]), rel=1e-6)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_weights_restored_bit_exactly(tok, batches, finetune):
    before = {n: p.detach().clone() for n, p in tiny(tok, finetune).named_parameters()}
    model, _ = run_step(tok, batches, finetune, lamb=3.0, alpha=0.7)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_passes_order_and_the_global_norm_perturbation(tok, batches, finetune):
    """Weights and inputs seen by each forward: harmful at theta, harmful at theta - alpha g / ||g|| with one
    norm over every trained parameter (not one per tensor), refusal at theta."""
    alpha = 0.4
    want = hand(tiny(tok, finetune), batches, 1.0, alpha)
    model = tiny(tok, finetune)
    trained = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["input_ids"], {n: p.detach().clone() for n, p in trained.items()})),
        with_kwargs=True)
    B.Booster(B.Options(alpha=alpha), model, RATES, 0).step(model, draw_from(batches), 0)
    hook.remove()
    assert [ids is batches["harmful"]["input_ids"] for ids, _ in seen] == [True, True, False]
    assert seen[2][0] is batches["refusal"]["input_ids"]
    theta = want["theta"]
    for n in trained:
        assert torch.equal(seen[0][1][n], theta[n]) and torch.equal(seen[2][1][n], theta[n]), n
        assert close(seen[1][1][n] - theta[n], want["shift"][n]), n
    moved = math.sqrt(sum(float(((seen[1][1][n] - theta[n]) ** 2).sum()) for n in trained))
    assert moved == pytest.approx(alpha, rel=1e-5)  # one step of length alpha in all the parameters together
    per_tensor = [float((seen[1][1][n] - theta[n]).norm()) for n in trained]
    assert max(per_tensor) < alpha * 0.999  # a norm per tensor would move each tensor by alpha


def test_signs_of_the_lambda_terms(tok, batches):
    """grad - grad f is +lamb * (g - g'), g at theta and g' at theta'; and it scales with lamb."""
    want = hand(tiny(tok, "full"), batches, 1.0, 0.3)
    one, _ = run_step(tok, batches, "full", lamb=1.0, alpha=0.3)
    four, _ = run_step(tok, batches, "full", lamb=4.0, alpha=0.3)
    for (n, p1), (_, p4) in zip(one.named_parameters(), four.named_parameters(), strict=True):
        diff = want["g"][n] - want["g_after"][n]
        assert close(p1.grad - want["gf"][n], diff), n
        assert close(p4.grad - want["gf"][n], 4.0 * diff), n


@pytest.mark.parametrize("options", [{"lamb": 0.0}, {"alpha": 0.0}])
def test_lamb_or_alpha_zero_is_plain_sft_on_the_refusals(tok, batches, options):
    model, step = run_step(tok, batches, "full", **options)
    ref = tiny(tok, "full")
    ref(**batches["refusal"]).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-13), n
    if "alpha" in options:
        assert step.terms["harmful_ce_after"] == pytest.approx(step.terms["harmful_ce"], rel=1e-12)
    assert step.terms["loss"] == pytest.approx(step.terms["refusal_ce"], rel=1e-6)


def test_spent_counts_three_passes(tok, batches):
    _, step = run_step(tok, batches, "full")
    streams = B.Booster(B.Options(), None, RATES, 0).streams(
        {k: v for k, v in ROWS.items() if k != "benign"}, tok, DATA)
    sup = {s: sum(sum(y != D.IGNORE for y in it.labels[1:]) for it in items) for s, items in streams.items()}
    length = {s: sum(len(it.input_ids) for it in items) for s, items in streams.items()}
    assert step.spent.examples == 6
    assert step.spent.tokens == sup["refusal"] + 2 * sup["harmful"]
    assert step.spent.flops == RATES.train * (length["refusal"] + 2 * length["harmful"])
    assert step.spent.generated == 0
    # padding is not counted: the batches are padded
    assert length["harmful"] < batches["harmful"]["input_ids"].numel()
    assert length["refusal"] < batches["refusal"]["input_ids"].numel()


# --- pure functions ---------------------------------------------------------------------------------------

def test_global_norm_and_the_harmful_step():
    a, b = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64)
    assert float(B.global_norm([a, b])) == pytest.approx(5.0)
    da, db = B.harmful_step([a, b], 0.5)
    assert torch.allclose(da, -0.5 * a / (5 + 1e-7)) and torch.allclose(db, -0.5 * b / (5 + 1e-7))
    assert float(B.update(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), 10.0)) == 1 + 20 - 30
    assert B.objective(1.0, 2.0, 0.5, 4.0) == 1.0 + 4.0 * 1.5


# --- options, roles, streams ------------------------------------------------------------------------------

def test_options_defaults_and_ranges():
    o = B.Options()
    assert (o.lamb, o.alpha) == (5.0, 0.1)
    assert B.Options(lamb=0, alpha=0).lamb == 0
    for bad in ({"lamb": -0.1}, {"alpha": -1e-3}, {"lamb": float("nan")}, {"rho": 1.0}):
        with pytest.raises(ValidationError):
            B.Options(**bad)
    with pytest.raises(ValidationError):
        o.lamb = 1.0  # frozen


def test_class_vars():
    assert B.Booster.name == "booster"
    assert B.Booster.Options is B.Options
    assert B.Booster.needs == ("refusal", "harmful")
    assert B.Booster.uses == ("refusal", "harmful", "benign")
    assert B.Booster.official_finetune == "lora"


def test_streams_hold_refusals_then_benign_and_harmful(tok):
    method = B.Booster(B.Options(), None, RATES, 0)
    streams = method.streams(ROWS, tok, DATA)

    def items(rows):
        return [D.tokenize_pair(tok, D.format_prompt(tok, r["prompt"], DATA), r["response"], DATA.max_length)
                for r in rows]

    assert set(streams) == {"refusal", "harmful"}
    assert streams["refusal"] == items(ROWS["refusal"] + ROWS["benign"])
    assert streams["harmful"] == items(ROWS["harmful"])
    it = streams["harmful"][0]
    prompt = len(tok(D.format_prompt(tok, ROWS["harmful"][0]["prompt"], DATA), add_special_tokens=False)["input_ids"])
    assert set(it.labels[:prompt]) == {D.IGNORE} and D.IGNORE not in it.labels[prompt:]  # loss on the answer only
    without = method.streams({k: v for k, v in ROWS.items() if k != "benign"}, tok, DATA)
    assert without["refusal"] == items(ROWS["refusal"])


@pytest.mark.parametrize("role", ["refusal", "harmful"])
def test_missing_role_is_a_clear_error(tok, role):
    rows = {**ROWS, role: []}
    with pytest.raises(ValueError, match=f"needs {role} rows"):
        B.Booster(B.Options(), None, RATES, 0).streams(rows, tok, DATA)
    rows.pop(role)
    with pytest.raises(ValueError, match=f"needs {role} rows"):
        B.Booster(B.Options(), None, RATES, 0).streams(rows, tok, DATA)


def test_bad_rows_and_streams_are_clear_errors(tok):
    method = B.Booster(B.Options(), None, RATES, 0)
    rows = {**ROWS, "benign": [{"prompt": "hi"}]}
    with pytest.raises(ValueError, match="benign row 1 has no text field 'response'"):
        method.streams(rows, tok, DATA)
    with pytest.raises(ValueError, match="no stream 'benign'"):
        method.collate("benign", [], 0)
