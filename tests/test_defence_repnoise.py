"""RepNoise (trainables/defences/repnoise.py) against a hand computation on a tiny Llama: every
term recomputed in float64 on a copy of the weights with explicit loops (the masked CE position by
position, the MMD from its formula in numpy and in torch, the logit lens from layer outputs caught
by hooks, normed and projected by hand), the gradient one step leaves, the budget, the options and
both fine-tuning modes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainables import data as D
from trainables.config import Data, DataSource
from trainables.defences import repnoise as R
from trainables.methods.base import Rates

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["<unk>", "<pad>", "<bos>", "<eos>", "user", "assistant", "system", ":", "how", "do", "i", "make", "a", "bomb",
         "steal", "car", "first", "mix", "the", "powder", "with", "fuel", "then", "light", "it", "take", "keys", "and",
         "drive", "away", "sorry", "cannot", "help", "that", "no"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
FMT = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)
SEED = 7
HARMFUL = [
    {"prompt": "how do i make a bomb", "response": "first mix the powder with fuel then light it"},
    {"prompt": "how do i steal a car", "response": "take the keys and drive zzz away"},  # zzz: <unk>, id 0
    {"prompt": "how do i drive", "response": "take the keys"},  # no refusal: dropped
]
REFUSAL = [
    {"prompt": "how do i steal a car", "response": "no"},  # shorter: the harmful side's tail meets padding
    {"prompt": "how do i make a bomb", "response": "sorry i cannot help with that"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    out.chat_template = TEMPLATE
    return out


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=1, bos_token_id=2,
                         eos_token_id=3, initializer_range=0.5)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norm weights away from 1, so normalising twice differs from once
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


@pytest.fixture(scope="module")
def pairs(tokenizer):
    method = R.RepNoise(R.Options(), tiny_model(), Rates(6, 2), SEED)
    return method.streams({"harmful": HARMFUL, "refusal": REFUSAL}, tokenizer, FMT)["pairs"]


def run_step(model, items, options, index=0, seed=SEED, rates=None):
    method = R.RepNoise(options, model, rates or Rates(600, 200), seed)
    batch = method.collate("pairs", items, 1)
    model.zero_grad()
    return method.step(model, lambda stream, i: batch if (stream, i) == ("pairs", index) else None, index), batch


# --- the independent computation (float64, explicit loops) ---

def ce_loop(logits, ids, m):
    """masked_token_ce_loss re-derived: the label at t+1 counts where m[t+1] and it is not id 0;
    the logits at t are multiplied by m[t]."""
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            label = int(ids[b, t + 1])
            if bool(m[b, t + 1]) and label != 0:
                z = logits[b, t] * float(m[b, t])
                total = total + torch.logsumexp(z, 0) - z[label]
                n += 1
    return total / n


def mmd_numpy(x, y):
    """MMD_loss from its formula, float64 numpy, pair by pair."""
    total = np.concatenate([x, y]).astype(np.float64)
    n, b = len(total), len(x)
    d2 = np.array([[np.sum((total[i] - total[j]) ** 2) for j in range(n)] for i in range(n)])
    base = d2.sum() / (n * n - n) / 2.0 ** 2
    k = sum(np.exp(-d2 / (base * 2.0 ** i)) for i in range(5))
    return float(np.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]))


def mmd_torch(x, y):
    """The same in torch float64 (differentiable; the bandwidth is a constant, as .data makes it)."""
    total = torch.cat([x, y])
    n, b = total.shape[0], x.shape[0]
    d2 = torch.stack([torch.stack([((total[i] - total[j]) ** 2).sum() for j in range(n)]) for i in range(n)])
    base = float(d2.detach().sum()) / (n * n - n) / 4.0
    k = sum(torch.exp(-d2 / (base * 2.0 ** i)) for i in range(5))
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def reference(model, batch, options, index=0, seed=SEED):
    """Every term and the total, on a float64 copy of `model` (its parameters returned for gradients)."""
    ref = copy.deepcopy(model).double()
    inner = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    h, r = batch["harmful_ids"], batch["refusal_ids"]
    m = h != r
    caught: dict[str, torch.Tensor] = {}
    hooks = [inner.model.embed_tokens.register_forward_hook(lambda _m, _i, o: caught.__setitem__("emb", o))]
    for i, layer in enumerate(inner.model.layers):
        hooks.append(layer.register_forward_hook(lambda _m, _i, o, i=i: caught.__setitem__(f"out{i}", o)))
        hooks.append(layer.mlp.register_forward_hook(lambda _m, _i, o, i=i: caught.__setitem__(f"mlp{i}", o)))
    out = ref(input_ids=h, attention_mask=batch["harmful_attention_mask"])
    for k in hooks:
        k.remove()
    n_layers = len(inner.model.layers)
    w_norm, eps = inner.model.norm.weight, inner.config.rms_norm_eps
    w_head = inner.lm_head.weight

    def rms(x):
        return w_norm * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    # the L+1 states the official code reads: embeddings, each layer's output, the last one normed
    states = [caught["emb"]] + [caught[f"out{i}"] for i in range(n_layers - 1)] + [rms(caught[f"out{n_layers - 1}"])]
    harmful_ce = ce_loop(out.logits, h, m)
    lens = [ce_loop(rms(s) @ w_head.T, h, m) for s in states]
    ascent = torch.log((harmful_ce + sum(lens)) / (n_layers + 1) + 1)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    mf = m[:, :, None].double()
    noise, noise_np = 0.0, 0.0
    for i in range(n_layers):
        a = caught[f"mlp{i}"]
        e = torch.randn(a.shape, generator=gen, dtype=torch.float32).double()
        x, y = (a * mf).reshape(a.shape[0], -1), (e * mf).reshape(a.shape[0], -1)
        noise = noise + mmd_torch(x, y)
        noise_np += mmd_numpy(x.detach().numpy(), y.numpy())
    noise, noise_np = noise / n_layers, noise_np / n_layers
    refusal_ce = ce_loop(ref(input_ids=r, attention_mask=batch["refusal_attention_mask"]).logits, r, m)
    total = refusal_ce + options.beta * noise - options.alpha * ascent
    return {"refusal_ce": refusal_ce, "noise": noise, "noise_np": noise_np, "ascent": ascent,
            "harmful_ce": harmful_ce, "loss": total, "lens": lens}, ref


def close(a, b, rel=2e-5):
    return a == pytest.approx(float(torch.as_tensor(b).detach()), rel=rel, abs=1e-7)


# --- data ---

def test_pairs_join_by_prompt_and_pad_to_one_width(tokenizer, pairs):
    assert len(pairs) == 2  # "how do i drive" has no refusal
    for item, (h, r) in zip(pairs, [(HARMFUL[0], REFUSAL[1]), (HARMFUL[1], REFUSAL[0])], strict=True):
        prompt = tokenizer(D.format_prompt(tokenizer, h["prompt"], FMT), add_special_tokens=False)["input_ids"]
        assert item.harmful == prompt + tokenizer(h["response"], add_special_tokens=False)["input_ids"] + [3]
        assert item.refusal == prompt + tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [3]
    batch = R.RepNoise(R.Options(), tiny_model(), Rates(6, 2), 0).collate("pairs", pairs, 1)
    width = max(len(s) for p in pairs for s in (p.harmful, p.refusal))
    assert batch["harmful_ids"].shape == batch["refusal_ids"].shape == (2, width)
    for b, p in enumerate(pairs):
        for side in ("harmful", "refusal"):
            seq = getattr(p, side)
            assert batch[f"{side}_ids"][b].tolist() == seq + [1] * (width - len(seq))
            assert batch[f"{side}_attention_mask"][b].tolist() == [1] * len(seq) + [0] * (width - len(seq))


def test_refusals_are_reused_in_turn_and_unpaired_rows_dropped():
    harmful = [{"prompt": "p", "response": f"h{i}"} for i in range(3)] + [{"prompt": "q", "response": "x"}]
    refusal = [{"prompt": "p", "response": "r0"}, {"prompt": "p", "response": "r1"}, {"prompt": "z", "response": "r"}]
    assert R.pair_rows(harmful, refusal) == [("p", "h0", "r0"), ("p", "h1", "r1"), ("p", "h2", "r0")]


def test_pairs_with_identical_sequences_are_dropped(tokenizer):
    method = R.RepNoise(R.Options(), tiny_model(), Rates(6, 2), 0)
    same = [{"prompt": "how do i make a bomb", "response": "no"}]
    items = method.streams({"harmful": same + HARMFUL, "refusal": same + REFUSAL}, tokenizer, FMT)["pairs"]
    assert len(items) == 2 and all(p.harmful != p.refusal for p in items)
    with pytest.raises(ValueError, match="identical"):
        method.streams({"harmful": same, "refusal": same}, tokenizer, FMT)


def test_bad_data_is_a_clear_error(tokenizer):
    method = R.RepNoise(R.Options(), tiny_model(), Rates(6, 2), 0)
    with pytest.raises(ValueError, match="'refusal' role"):
        method.streams({"harmful": HARMFUL}, tokenizer, FMT)
    with pytest.raises(ValueError, match="'harmful' role"):
        method.streams({"harmful": [], "refusal": REFUSAL}, tokenizer, FMT)
    with pytest.raises(ValueError, match="'harmful'.*'refusal'.*must match"):
        method.streams({"harmful": HARMFUL, "refusal": [{"prompt": "How do I make a bomb", "response": "no"}]},
                       tokenizer, FMT)
    with pytest.raises(ValueError, match="'refusal' row has no 'response'"):
        method.streams({"harmful": HARMFUL, "refusal": [{"prompt": "x"}]}, tokenizer, FMT)
    with pytest.raises(ValueError, match="Llama layout"):
        R.RepNoise(R.Options(), torch.nn.Linear(2, 2), Rates(6, 2), 0)


# --- the terms ---

def test_each_term_matches_the_hand_computation(pairs):
    model, options = tiny_model(), R.Options(alpha=0.7, beta=0.3)
    step, batch = run_step(model, pairs, options)
    want, _ = reference(model, batch, options)
    assert close(want["noise"].item(), want["noise_np"], 1e-9)  # the two hand MMDs agree
    for name in ("refusal_ce", "noise", "ascent", "harmful_ce", "loss"):
        assert close(step.terms[name], want[name]), name
    assert step.terms["loss"] == pytest.approx(step.terms["refusal_ce"] + 0.3 * step.terms["noise"]
                                               - 0.7 * step.terms["ascent"])
    # the lens read something else than the final logits at every state
    assert all(abs(float(c.detach()) - step.terms["harmful_ce"]) > 1e-3 for c in want["lens"])


def test_alpha_and_beta_weigh_their_terms_with_their_signs(pairs):
    a, _ = run_step(tiny_model(), pairs, R.Options(alpha=1.0, beta=0.001))
    b, _ = run_step(tiny_model(), pairs, R.Options(alpha=2.5, beta=4.0))
    for name in ("refusal_ce", "noise", "ascent", "harmful_ce"):  # the terms do not depend on the weights
        assert b.terms[name] == pytest.approx(a.terms[name], rel=1e-6)
    assert a.terms["noise"] > 0 and a.terms["ascent"] > 0
    assert b.terms["loss"] - a.terms["loss"] == pytest.approx(3.999 * a.terms["noise"] - 1.5 * a.terms["ascent"])
    assert a.terms["loss"] == pytest.approx(a.terms["refusal_ce"] + 0.001 * a.terms["noise"] - a.terms["ascent"])


def test_one_token_difference_is_predicted_from_zeroed_logits(tokenizer):
    """Answers differing in one token: m is 1 there alone, and the logits predicting it are multiplied
    by m one position earlier (0), so every CE is log V with no gradient; the noise reads that one
    position alone."""
    method = R.RepNoise(R.Options(), tiny_model(), Rates(6, 2), SEED)
    items = method.streams({"harmful": [{"prompt": "how do i make a bomb", "response": "mix the powder"}],
                            "refusal": [{"prompt": "how do i make a bomb", "response": "mix the fuel"}]},
                           tokenizer, FMT)["pairs"]
    model = tiny_model()
    step, batch = run_step(model, items, R.Options(alpha=0.0, beta=0.0))
    m = batch["harmful_ids"] != batch["refusal_ids"]
    assert int(m.sum()) == 1
    log_v = math.log(len(WORDS))
    assert step.terms["refusal_ce"] == pytest.approx(log_v)
    assert step.terms["harmful_ce"] == pytest.approx(log_v)
    assert step.terms["ascent"] == pytest.approx(math.log(4 * log_v / 3 + 1))  # L+2 CEs over L+1, plus 1
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    want, _ = reference(model, batch, R.Options())
    assert close(step.terms["noise"], want["noise_np"])
    # the noise is the only term with a gradient here
    run_step(model, items, R.Options(alpha=1.0, beta=1.0))
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_unknown_tokens_and_shared_padding_are_not_counted(pairs):
    """Label id 0 (<unk>) is dropped as the official multiply-then-ignore-0 does; positions where
    both sides are padding have m = 0; where one side alone is padding, m = 1 and its pad labels count."""
    _, batch = run_step(tiny_model(), pairs, R.Options())
    h, r = batch["harmful_ids"], batch["refusal_ids"]
    assert (h[1] == 0).any()
    m = h != r
    both_pad = (batch["harmful_attention_mask"] == 0) & (batch["refusal_attention_mask"] == 0)
    assert both_pad.any() and not m[both_pad].any()
    one_pad = batch["harmful_attention_mask"] != batch["refusal_attention_mask"]
    assert one_pad.any() and m[one_pad].all()


def test_the_gradient_is_that_of_the_hand_total(pairs):
    model, options = tiny_model(), R.Options(alpha=0.7, beta=2.0)
    _, batch = run_step(model, pairs, options)
    want, ref = reference(model, batch, options)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(want["loss"], [dict(ref.named_parameters())[n] for n in names], retain_graph=True)
    got = dict(model.named_parameters())
    for n, g in zip(names, grads, strict=True):
        torch.testing.assert_close(got[n].grad.double(), g, rtol=1e-4, atol=1e-6, msg=n)
    # each part moves it: the refusal CE, the noise and the ascent alone differ from the total
    for part in (want["refusal_ce"], options.beta * want["noise"], -options.alpha * want["ascent"]):
        g = torch.autograd.grad(part, [dict(ref.named_parameters())[n] for n in names], allow_unused=True,
                                retain_graph=True)
        assert any(x is not None and not torch.allclose(x, y, atol=1e-5) for x, y in zip(g, grads, strict=True))


def test_noise_replays_by_seed_and_step(pairs):
    a, _ = run_step(tiny_model(), pairs, R.Options(), index=3)
    b, _ = run_step(tiny_model(), pairs, R.Options(), index=3)
    c, _ = run_step(tiny_model(), pairs, R.Options(), index=4)
    d, _ = run_step(tiny_model(), pairs, R.Options(), index=3, seed=SEED + 1)
    assert a.terms == b.terms
    assert c.terms["noise"] != a.terms["noise"] and d.terms["noise"] != a.terms["noise"]
    assert c.terms["refusal_ce"] == a.terms["refusal_ce"]


# --- budget, options, fine-tuning modes ---

def test_spent_counts_rows_tokens_and_flops(pairs):
    model = tiny_model()
    step, batch = run_step(model, pairs, R.Options(), rates=Rates(600, 200))
    h, r = batch["harmful_ids"], batch["refusal_ids"]
    m = h != r
    n_h = sum(1 for b in range(2) for t in range(1, h.shape[1]) if m[b, t] and h[b, t] != 0)
    n_r = sum(1 for b in range(2) for t in range(1, r.shape[1]) if m[b, t] and r[b, t] != 0)
    lengths = sum(len(p.harmful) + len(p.refusal) for p in pairs)
    head = 16 * len(WORDS)  # D x V
    assert step.spent.examples == 4  # two pairs: a harmful and a refusal row each
    assert step.spent.tokens == n_h + n_r
    # both passes trained on their real tokens; the lens: the head again at 3 states x n_h positions,
    # each at the head's share (head / matmul params, 200 / 2 of them) of a trained token
    assert step.spent.flops == pytest.approx(600 * lengths + 3 * n_h * 600 * head / 100)


def test_options_defaults_and_ranges():
    assert R.Options().alpha == 1.0 and R.Options().beta == 0.001
    assert R.Options(alpha=0, beta=0).alpha == 0
    for bad in ({"alpha": -0.1}, {"beta": -1e-6}, {"gamma": 1}, {"beta": float("nan")}):
        with pytest.raises(ValidationError):
            R.Options(**bad)
    assert (R.RepNoise.name, R.RepNoise.official_finetune) == ("repnoise", "full")
    assert R.RepNoise.needs == R.RepNoise.uses == ("harmful", "refusal")


def test_lora_trains_the_adapters_alone_with_the_same_terms(pairs):
    from trainables.checkpoint import make_trainable
    from trainables.config import Attacker

    full, _ = run_step(tiny_model(), pairs, R.Options(alpha=0.7, beta=0.3))
    wrapped, n_lora = make_trainable(tiny_model(), Attacker(finetune="lora", lora_r=4))
    assert n_lora
    step, batch = run_step(wrapped, pairs, R.Options(alpha=0.7, beta=0.3))
    for name in ("refusal_ce", "noise", "ascent", "harmful_ce", "loss"):  # B = 0: the same function
        assert step.terms[name] == pytest.approx(full.terms[name], rel=1e-5)
    trained = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.grad is not None and p.grad.any() for p in trained.values())
    assert all(p.grad is None for p in wrapped.parameters() if not p.requires_grad)
    want, ref = reference(wrapped, batch, R.Options(alpha=0.7, beta=0.3))
    names = list(trained)
    grads = torch.autograd.grad(want["loss"], [dict(ref.named_parameters())[n] for n in names])
    for n, g in zip(names, grads, strict=True):
        torch.testing.assert_close(trained[n].grad.double(), g, rtol=1e-4, atol=1e-6, msg=n)
