"""TAR as a defence method (trainables/defences/tar.py): the tamper-resistance loss, its weights and
the retain distance by hand, the gradient an outer step leaves against an independent first-order
re-implementation (own AdamW, own losses, torch.func), under full fine-tuning and LoRA, the weights
restored bit-exactly, the streams, the options and what the budget counts."""

import copy
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
from trainables.defences.tar import (
    TAR,
    Options,
    inner_lr,
    representation_distance,
    tamper_resistance_loss,
    tr_steps,
    tr_weight,
)
from trainables.methods import Rates

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)
HARMFUL = [{"prompt": f"how do i {v} the {o}", "response": " ".join(toyworld.how_to(v, o, "quietly").split()[:n])}
           for (v, o), n in zip([("hack", "server"), ("poison", "car"), ("steal", "lock"), ("forge", "garden"),
                                 ("sabotage", "bridge"), ("hack", "car"), ("steal", "bridge")],
                                [9, 4, 14, 6, 3, 11, 7], strict=True)]  # lengths apart: every batch has padding
BENIGN = [{"prompt": f"tell me how to {v} the {o}", "response": f"sure , {v} the {o} with care" + " quietly" * i}
          for i, (v, o) in enumerate([("bake", "car"), ("clean", "lock"), ("paint", "garden"), ("fix", "bridge")])]
RATES = Rates(train=7, forward=2)


@pytest.fixture(scope="module")
def tok():
    return toyworld._build_tokenizer(None)  # the toy world's word-level tokenizer and chat template, no training


def tiny(tok, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).double().eval()  # float64: the hand computations agree to ~1e-12


def perturb(params, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def drawer(method, tok, batch_size=2, seed=3):
    """What the builder does: one BatchStream per stream with the method's collate; records each draw."""
    streams = {name: D.BatchStream(items, batch_size, seed, tok.pad_token_id,
                                   collate=lambda its, pad, name=name: method.collate(name, its, pad))
               for name, items in method.streams({"harmful": HARMFUL, "benign": BENIGN}, tok, DATA).items()}
    log = []

    def draw(stream, i):
        log.append((stream, i))
        return streams[stream][i]
    return draw, log


# --- independent re-derivations: own loops, own AdamW, torch.func over a copy of the weights ---

def ce_by_hand(logits, labels):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != D.IGNORE:
                row = logits[b, t - 1]
                total = total + torch.logsumexp(row, 0) - row[labels[b, t]]
                n += 1
    return total / n


def minus_entropy_by_hand(logits):
    """-(1/(B·T)) Σ_{b,t} H(softmax(logits[b, t])), every position, padding included."""
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            p = torch.softmax(logits[b, t], 0)
            total = total - (p * torch.log(p)).sum()
            n += 1
    return -total / n


def distance_by_hand(hidden, reference):
    """(1/(L+1)) Σ_i (1/(B·T)) Σ_{b,t} sqrt(Σ_d (h - r)²); a position with h == r adds 0 with 0 gradient."""
    states = []
    for h, r in zip(hidden, reference, strict=True):
        total = 0.0
        for b in range(h.shape[0]):
            for t in range(h.shape[1]):
                d = h[b, t] - r[b, t]
                if bool((d != 0).any()):
                    total = total + torch.sqrt((d * d).sum())
        states.append(total / (h.shape[0] * h.shape[1]))
    return sum(states) / len(states)


def expected_step(shadow, ref_model, batches, opts, lr):
    """The outer step re-derived: plain AdamW (torch's defaults written out) on the hand CE, the hand
    TR gradient at each adapted point, restore, the hand retain gradient at θ; first order."""
    names = [n for n, p in shadow.named_parameters() if p.requires_grad]
    theta0 = {n: p.detach().clone() for n, p in shadow.named_parameters() if p.requires_grad}

    def run(theta, batch, **kw):
        return functional_call(shadow, theta, args=(), kwargs={"input_ids": batch["input_ids"],
                                                              "attention_mask": batch["attention_mask"], **kw})

    def grad(loss_of, theta):
        leaf = {n: v.detach().clone().requires_grad_(True) for n, v in theta.items()}
        loss = loss_of(leaf)
        return loss.detach(), dict(zip(names, torch.autograd.grad(loss, [leaf[n] for n in names]), strict=True))

    K, beta1, beta2, eps, wd = opts.inner_steps, 0.9, 0.999, 1e-8, 0.01
    theta = dict(theta0)
    m = {n: torch.zeros_like(v) for n, v in theta.items()}
    v2 = {n: torch.zeros_like(v) for n, v in theta.items()}
    store = {n: torch.zeros_like(v) for n, v in theta.items()}
    trs, ws = [], []
    for k in range(K):
        batch = batches["attack"][k]
        ce, g = grad(lambda th, batch=batch: ce_by_hand(run(th, batch).logits, batch["labels"]), theta)
        new = {}
        for n in names:
            m[n] = beta1 * m[n] + (1 - beta1) * g[n]
            v2[n] = beta2 * v2[n] + (1 - beta2) * g[n] ** 2
            mhat, vhat = m[n] / (1 - beta1 ** (k + 1)), v2[n] / (1 - beta2 ** (k + 1))
            new[n] = theta[n] * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)
        theta = new
        if (k + 1) % opts.tr_every == 0:
            w = opts.tr_coefficient * math.exp(opts.schedule_lambda * (k - (K - 1)))
            tr, gt = grad(lambda th: minus_entropy_by_hand(run(th, batches["tamper"]).logits), theta)
            for n in names:
                store[n] += w * gt[n]
            trs.append(float(tr))
            ws.append(w)
    retain = batches["retain"]
    with torch.no_grad():
        ref_hidden = ref_model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"],
                               output_hidden_states=True).hidden_states
    parts = {}

    def retain_loss(th):
        out = run(th, retain, output_hidden_states=True)
        parts["ce"], parts["dist"] = ce_by_hand(out.logits, retain["labels"]), distance_by_hand(out.hidden_states,
                                                                                               ref_hidden)
        return opts.retain_coefficient * (parts["ce"] + parts["dist"])
    _, gr = grad(retain_loss, theta0)
    terms = {"retain_ce": parts["ce"].item(), "retain_distance": parts["dist"].item(), "inner_final_ce": float(ce),
             "tamper_resistance": sum(w * t for w, t in zip(ws, trs, strict=True)) / sum(ws),
             "loss": opts.retain_coefficient * (parts["ce"] + parts["dist"]).item()
             + sum(w * t for w, t in zip(ws, trs, strict=True))}
    return {n: gr[n] + store[n] for n in names}, terms


def built(tok, finetune, opts):
    """The method on a tiny model as the builder makes it, then trained away from its start (as after
    some outer steps), so the retain distance is not zero; and an independent copy of the reference."""
    model = tiny(tok)
    base_copy = copy.deepcopy(model)
    if finetune == "lora":
        model, _ = make_trainable(model, Attacker(finetune="lora", lora_r=2, lora_alpha=4.0))
    method = TAR(opts, model, RATES, seed=5)
    trained = [p for p in model.parameters() if p.requires_grad]
    perturb(trained)
    return model, method, trained, base_copy


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize(("K", "every", "lam", "rc"), [(3, 1, 0.5, 0.7), (4, 2, 0.3, 1.0)])
def test_the_step_leaves_the_first_order_tar_gradient(tok, finetune, K, every, lam, rc):
    opts = Options(inner_steps=K, tr_every=every, inner_lrs=[0.05], tamper_rows=3, tr_coefficient=4.0,
                   schedule_lambda=lam, retain_coefficient=rc)
    model, method, trained, base_copy = built(tok, finetune, opts)
    shadow = copy.deepcopy(model)
    draw, log = drawer(method, tok)
    index = 2
    batches = {"attack": [draw("attack", index * K + k) for k in range(K)], "tamper": draw("tamper", index),
               "retain": draw("retain", index)}
    assert (batches["tamper"]["attention_mask"] == 0).any()  # padding there, which the entropy reads
    assert (batches["retain"]["attention_mask"] == 0).any()  # and the distance
    log.clear()
    for p in trained:
        p.grad = torch.zeros_like(p)  # as the builder leaves them
    step = method.step(model, draw, index)
    assert sorted(log) == sorted([("tamper", index), ("retain", index)] + [("attack", index * K + k) for k in range(K)])
    want, terms = expected_step(shadow, base_copy, batches, opts, 0.05)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(want) and (finetune == "full") == (len(names) == len(list(model.parameters())))
    for n, p in zip(names, trained, strict=True):
        torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-7, msg=n)  # Adam magnifies rounding
    for key, value in terms.items():
        assert step.terms[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert step.terms["inner_lr"] == 0.05
    assert step.terms["retain_distance"] > 0 and step.terms["tamper_resistance"] < 0


def test_the_weights_come_back_bit_exact_and_no_optimizer_state_leaks(tok):
    opts = Options(inner_steps=3, tr_every=1, inner_lrs=[0.05, 0.01, 0.02], tamper_rows=3)
    model = tiny(tok)
    first, fresh = TAR(opts, model, RATES, seed=5), TAR(opts, model, RATES, seed=5)
    perturb(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    draw, _ = drawer(first, tok)
    first.step(model, draw, 0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model.zero_grad()
    second = first.step(model, draw, 1)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = fresh.step(model, draw, 1)  # a method that never ran step 0: the same step 1
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert second.terms == alone.terms


def test_the_tamper_resistance_loss_is_minus_the_mean_entropy_over_every_position():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for t in range(3):
            z = [math.exp(x) for x in logits[b, t].tolist()]
            total += -sum(e / sum(z) * math.log(e / sum(z)) for e in z)
    assert float(tamper_resistance_loss(logits)) == pytest.approx(-total / 6, rel=1e-12)
    flat = torch.zeros(1, 2, 5, dtype=torch.float64)  # uniform: the most uncertain, the lowest loss
    assert float(tamper_resistance_loss(flat)) == pytest.approx(-math.log(5), rel=1e-12)
    assert float(tamper_resistance_loss(logits)) > -math.log(5)


def test_the_weights_grow_to_the_coefficient_at_the_last_inner_step():
    assert tr_steps(64, 4) == list(range(3, 64, 4))  # after inner steps 3, 7, ..., 63 (official: (k+1) % 4 == 0)
    assert tr_steps(3, 1) == [0, 1, 2]
    for k in (3, 7, 31, 63):
        assert tr_weight(k, 64, 4.0, 0.0625) == pytest.approx(4 * math.exp(0.0625 * (k - 63)), rel=1e-14)
    assert tr_weight(63, 64, 4.0, 0.0625) == 4.0
    assert tr_weight(3, 64, 4.0, 0.0625) == pytest.approx(4 * math.exp(-3.75), rel=1e-14)


def test_the_retain_distance_by_hand_and_against_unpadded_passes(tok):
    model, ref = tiny(tok), tiny(tok)
    perturb(list(model.parameters()))
    method = TAR(Options(tamper_rows=3), model, RATES, seed=5)
    batch = D.collate(method.streams({"harmful": HARMFUL, "benign": BENIGN}, tok, DATA)["retain"][:3],
                      tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  output_hidden_states=True).hidden_states
        r = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True).hidden_states
        got = float(representation_distance(h, r))
        assert len(h) == 3  # L + 1 states: the embedding output and each layer's
        total = 0.0
        for i in range(3):
            for b in range(3):
                n = int(batch["attention_mask"][b].sum())
                alone_h = model(input_ids=batch["input_ids"][b:b + 1, :n], output_hidden_states=True).hidden_states[i]
                alone_r = ref(input_ids=batch["input_ids"][b:b + 1, :n], output_hidden_states=True).hidden_states[i]
                for t in range(batch["input_ids"].shape[1]):  # padding positions as the batch computes them
                    a, c = (alone_h[0, t], alone_r[0, t]) if t < n else (h[i][b, t], r[i][b, t])
                    torch.testing.assert_close(a, h[i][b, t], rtol=1e-9, atol=1e-9)
                    torch.testing.assert_close(c, r[i][b, t], rtol=1e-9, atol=1e-9)
                    total += math.sqrt(sum((x - y) ** 2 for x, y in zip(a.tolist(), c.tolist(), strict=True)))
    assert got == pytest.approx(total / (3 * 3 * batch["input_ids"].shape[1]), rel=1e-10)
    same = torch.zeros(2, 3, 4, dtype=torch.float64, requires_grad=True)
    representation_distance((same,), (torch.zeros(2, 3, 4, dtype=torch.float64),)).backward()
    assert torch.equal(same.grad, torch.zeros_like(same))  # where the model is its reference: 0, not nan


def test_the_inner_lr_is_drawn_by_seed_and_index():
    lrs = [2e-6, 2e-5, 4e-5]
    draws = [inner_lr(lrs, 5, i) for i in range(60)]
    assert draws == [inner_lr(lrs, 5, i) for i in range(60)]
    assert set(draws) == set(lrs)
    assert draws != [inner_lr(lrs, 6, i) for i in range(60)]


def test_the_step_reports_the_drawn_lr_and_counts_its_passes(tok):
    opts = Options(inner_steps=4, tr_every=2, inner_lrs=[1e-3, 2e-3, 3e-3], tamper_rows=3)
    model = tiny(tok)
    method = TAR(opts, model, RATES, seed=5)
    draw, _ = drawer(method, tok)
    step = method.step(model, draw, 7)
    assert step.terms["inner_lr"] == inner_lr(opts.inner_lrs, 5, 7)
    assert set(step.terms) == {"retain_ce", "retain_distance", "tamper_resistance", "inner_lr", "inner_final_ce",
                               "loss"}

    def real(batch):  # non-padding tokens, by hand
        return sum(1 for row in batch["attention_mask"].tolist() for x in row if x)

    def supervised(batch):
        return sum(1 for row in batch["labels"].tolist() for x in row[1:] if x != D.IGNORE)
    attack = [draw("attack", 7 * 4 + k) for k in range(4)]
    tamper, retain = draw("tamper", 7), draw("retain", 7)
    assert step.spent.examples == 2 * 4 + 2 + 2
    assert step.spent.tokens == sum(supervised(b) for b in attack) + 2 * real(tamper) + supervised(retain)
    trained = sum(real(b) for b in attack) + 2 * real(tamper) + real(retain)  # 4 attack, 2 tamper, 1 retain pass
    assert step.spent.flops == 7 * trained + 2 * real(retain)  # and the reference's forward


def test_the_streams_hold_out_the_last_harmful_rows_for_the_tamper_batch(tok):
    method = TAR(Options(tamper_rows=2), tiny(tok), RATES, seed=5)
    streams = method.streams({"harmful": HARMFUL, "benign": BENIGN, "refusal": BENIGN}, tok, DATA)

    def tokenized(rows):
        return [D.tokenize_pair(tok, D.format_prompt(tok, r["prompt"], DATA), r["response"], DATA.max_length)
                for r in rows]
    assert streams == {"attack": tokenized(HARMFUL[:-2]), "tamper": tokenized(HARMFUL[-2:]),
                       "retain": tokenized(BENIGN)}
    with pytest.raises(ValueError, match="more harmful rows than tamper_rows=2"):
        method.streams({"harmful": HARMFUL[:2], "benign": BENIGN}, tok, DATA)
    with pytest.raises(ValueError, match="more harmful rows"):
        method.streams({"benign": BENIGN}, tok, DATA)
    with pytest.raises(ValueError, match="needs benign rows"):
        method.streams({"harmful": HARMFUL}, tok, DATA)
    with pytest.raises(ValueError, match="benign row 2 needs text fields 'prompt' and 'response'"):
        method.streams({"harmful": HARMFUL, "benign": [BENIGN[0], {"prompt": "x"}]}, tok, DATA)
    with pytest.raises(ValueError, match="no stream 'forget'"):
        method.collate("forget", streams["attack"], tok.pad_token_id)


def test_the_options_default_to_the_official_run_and_refuse_what_is_out_of_range():
    o = Options()
    assert (o.inner_steps, o.tr_every, o.inner_lrs, o.tamper_rows) == (64, 4, [2e-6, 2e-5, 4e-5], 4)
    assert (o.tr_coefficient, o.schedule_lambda, o.retain_coefficient) == (4.0, 0.0625, 1.0)
    assert (TAR.name, TAR.needs, TAR.uses, TAR.official_finetune) == ("tar", ("harmful", "benign"),
                                                                      ("harmful", "benign"), "full")
    assert TAR.Options is Options
    for bad in ({"inner_steps": 0}, {"tr_every": 0}, {"inner_lrs": []}, {"inner_lrs": [2e-5, 0.0]},
                {"inner_lrs": [-1e-5]}, {"tamper_rows": 0}, {"tr_coefficient": -1.0}, {"schedule_lambda": -0.1},
                {"retain_coefficient": -1.0}, {"inner_steps": 2, "tr_every": 3}, {"inner_step": 64},
                {"tr_coefficient": float("nan")}):
        with pytest.raises(ValidationError):
            Options(**bad)
    with pytest.raises(ValidationError, match="tr_every=3 > inner_steps=2"):
        Options(inner_steps=2, tr_every=3)
