"""The G-effect probe: its first-order prediction is the loss change a small plain gradient step
makes, its blocks follow the layers (LoRA included), and a trial measured with it ends exactly as
one without, refinement replays included."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import attack_dict
from pydantic import ValidationError
from test_attack import attack  # registers the scripted evaluator
from transformers import AutoModelForCausalLM

from trainables import AttackConfig, run_attack
from trainables import data as D
from trainables.checkpoint import load_tokenizer, make_trainable
from trainables.config import Attacker, Checkpoint, Data, DataSource
from trainables.g_effect import BENIGN, HARMFUL, GEffectProbe, block_names
from trainables.names import G_EFFECT_RISKS, G_EFFECT_SECONDS, G_TOTAL, STEP0_CACHED, g_effect
from trainables.step0_cache import ENV

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_BLOCKS = ["embed_tokens", "layer00", "layer01", "lm_head", "norm"]


def toy(world, dtype=torch.float32):
    """The toy base (all weights trainable, in train mode), its tokenizer, and probe rows: the
    attack split's first rows, held-out benign answers and compliant held-out harmful answers."""
    tokenizer = load_tokenizer(Checkpoint(model=str(world / "base")))
    model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=dtype)
    model, _ = make_trainable(model, Attacker())
    model.train()
    risks = {BENIGN: rows_of(world, tokenizer, "benign_heldout.jsonl"),
             HARMFUL: rows_of(world, tokenizer, "eval.jsonl")}
    return model, tokenizer, rows_of(world, tokenizer, "attack.jsonl"), risks


def rows_of(world, tokenizer, split: str) -> list[D.Tokenized]:
    """The first 8 rows of a toy-world split, tokenised as a trial does (chat template)."""
    src = DataSource(source=str(world / split))
    data = Data(attack=src, eval=src, chat_template=True)
    return D.tokenize_rows(tokenizer, D.load_rows(src)[:8], src, data)


def blocks_of(curves: dict[str, float], risk: str) -> dict[str, float]:
    prefix = g_effect(risk, "")
    return {k[len(prefix):]: v for k, v in curves.items() if k.startswith(prefix) and k != g_effect(risk, G_TOTAL)}


# --- a: exactness -------------------------------------------------------------------------------

def test_first_order_prediction_is_the_loss_change_of_a_small_sgd_step(world):
    model, tokenizer, attack_rows, risks = toy(world, torch.float64)
    # the toy model's held-out benign answers are fit to a loss of 0.002, too flat to difference
    # through its float32 norms: its new benign task (loss 7) stands in as the benign risk here
    risks[BENIGN] = rows_of(world, tokenizer, "task.jsonl")
    curves = GEffectProbe(model, risks, tokenizer.pad_token_id, size=8).measure(attack_rows)

    # an independent reading: R(theta - eta * grad L) - R(theta), cross-entropy in float64
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grad = torch.autograd.grad(model(**D.collate(attack_rows, tokenizer.pad_token_id)).loss, params)
    theta = [p.detach().clone() for p in params]

    def risk(name: str, eta: float) -> float:
        batch = D.collate(risks[name], tokenizer.pad_token_id)
        with torch.no_grad():
            for p, t, g in zip(params, theta, grad, strict=True):
                p.copy_(t - eta * g)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                   ignore_index=D.IGNORE).item()

    for name in G_EFFECT_RISKS:
        total = curves[g_effect(name, G_TOTAL)]
        blocks = blocks_of(curves, name)
        assert sorted(blocks) == TOY_BLOCKS
        assert math.fsum(blocks.values()) == pytest.approx(total, rel=1e-12)
        errors = [abs(risk(name, eta) - risk(name, 0.0) - eta * total) / abs(eta * total)
                  for eta in (1e-3, 2.5e-4, 6.25e-5)]
        # second order left over: it shrinks with eta, to a few per cent
        assert errors[0] > errors[1] > errors[2] and errors[2] < min(0.05, errors[0] / 4), (name, errors)


def test_the_probe_leaves_weights_grads_rng_and_modes_as_they_were(world):
    model, tokenizer, attack_rows, risks = toy(world)
    model.model.layers[1].eval()  # modes are restored module by module, not model.train() after
    modes = [m.training for m in model.modules()]
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    curves = GEffectProbe(model, risks, tokenizer.pad_token_id, size=4).measure(attack_rows)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert torch.equal(torch.get_rng_state(), rng) and [m.training for m in model.modules()] == modes
    assert curves[G_EFFECT_SECONDS] > 0 and all(math.isfinite(v) for v in curves.values())


# --- b: blocks ----------------------------------------------------------------------------------

def test_block_names_follow_layers_whatever_the_wrapping():
    llama = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.11.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
    assert block_names(llama) == ["embed_tokens", "layer00", "layer11", "norm", "lm_head"]
    lora = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A.default",
            "base_model.model.lm_head.modules_to_save.default.weight"]
    assert block_names(lora) == ["layer00", "layer03", "embed_tokens", "lm_head"]
    gpt2 = ["transformer.wte.weight", "transformer.h.2.attn.c_attn.bias", "transformer.ln_f.weight"]
    assert block_names(gpt2) == ["wte", "layer02", "ln_f"]
    deep = [f"blocks.{i}.w" for i in (0, 7, 120)]
    assert block_names(deep) == ["layer000", "layer007", "layer120"]  # still sorts past 99 layers


def test_lora_at_init_gives_exact_zeros_for_the_a_matrices(world):
    tokenizer = load_tokenizer(Checkpoint(model=str(world / "base")))
    _, _, attack_rows, risks = toy(world)
    model = AutoModelForCausalLM.from_pretrained(world / "base")
    model, _ = make_trainable(model, Attacker(finetune="lora", lora_r=4))
    probe = GEffectProbe(model, risks, tokenizer.pad_token_id, size=4)
    assert sorted(set(probe.blocks)) == ["layer00", "layer01"]  # all-linear: no head, no embeddings
    both = probe.measure(attack_rows)
    assert all(math.isfinite(v) for v in both.values()) and both[g_effect(BENIGN, G_TOTAL)] != 0

    for name, p in model.named_parameters():  # B = 0 at init: only the A-matrices left, all gradients 0
        if "lora_B" in name:
            p.requires_grad_(False)
    only_a = GEffectProbe(model, risks, tokenizer.pad_token_id, size=4).measure(attack_rows)
    values = [v for k, v in only_a.items() if k != G_EFFECT_SECONDS]
    assert len(values) == 2 * 3 and all(v == 0.0 and math.copysign(1.0, v) == 1.0 for v in values)


# --- c: a trial with the probe ends as one without ----------------------------------------------

TIMING = ("wall_seconds", "eval_seconds", "accelerator_seconds")


def g_curves(curves: dict[str, float]) -> dict[str, float]:
    """The G-effect values of a point (its timing left out)."""
    return {k: v for k, v in curves.items() if any(k.startswith(g_effect(r, "")) for r in G_EFFECT_RISKS)}


def comparable(point) -> str:
    """A point as JSON without timings, the G-effect curves or the cache's flag (NaN equals NaN)."""
    d = dataclasses.asdict(point)
    for k in TIMING:
        d.pop(k)
    d["curves"] = {k: v for k, v in d["curves"].items()
                   if k not in g_curves(d["curves"]) and k not in (G_EFFECT_SECONDS, STEP0_CACHED)}
    d["crossings"] = {k: {u: v for u, v in c.items() if u not in TIMING} for k, c in d["crossings"].items()}
    return json.dumps(d, sort_keys=True)


def measured_everywhere(points, risks=G_EFFECT_RISKS) -> bool:
    evaluated = [p for p in points if not math.isnan(p.harmfulness)]
    return len(evaluated) == len(points) and all(
        G_EFFECT_SECONDS in p.curves and all(sorted(blocks_of(p.curves, r)) == TOY_BLOCKS for r in risks)
        for p in evaluated)


@pytest.fixture
def cache(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV, raising=False)


def test_a_staged_trial_ends_as_without_the_probe_and_step_0_is_measured_when_cached(world, cache):
    over = {"data": {"benign": {"source": str(world / "benign.jsonl")}}, "eval_every": 2, "phi": 1.0,
            "attacker": {"learning_rate": 1e-3, "dataset_size": 16, "batch_size": 4,
                         "stages": [{"steps": 3}, {"steps": 3, "data": "benign"}]}}
    off = run_attack(AttackConfig.model_validate(attack_dict(world, **over)))
    on = run_attack(AttackConfig.model_validate(attack_dict(world, **over, g_effect={"size": 4})))
    assert [(p.step, p.stage) for p in on.points] == [(0, 0), (2, 0), (3, 0), (4, 1), (6, 1)]
    assert [comparable(p) for p in on.points] == [comparable(p) for p in off.points]
    # g_effect is no part of the step-0 key: the probed trial reads back the unprobed one's step 0,
    # and still measures its own G-effect there
    assert measured_everywhere(on.points) and on.points[0].curves[STEP0_CACHED] == 1
    assert off.points[0].curves[STEP0_CACHED] == 0

    # another attacker of the release (same draw, other training): step 0's f is read back, its
    # G-effect measured again on the attacker's rows, and the same
    short = {**over, "attacker": {**over["attacker"], "learning_rate": 5e-4, "stages": [{"steps": 1}]}}
    again = run_attack(AttackConfig.model_validate(attack_dict(world, **short, g_effect={"size": 4})))
    step0 = again.points[0].curves
    assert step0[STEP0_CACHED] == 1 and measured_everywhere(again.points)
    assert g_curves(step0) == g_curves(on.points[0].curves) != {}


def test_a_refined_crossing_ends_as_without_the_probe(world):
    # f (scripted) crosses at 8, safe at the midpoint 6, crosses at 7; utility and the training
    # losses of the replays read the weights, so any change the probe made would show
    over = {"max_steps": 8, "eval_every": 4, "refine": 2, "attacker": {"learning_rate": 1e-3},
            "utility": {"data": {"source": str(world / "benign_heldout.jsonl")}, "size": 8, "epsilon": 1.0}}
    sequence = [0.0, 0.0, 0.9, 0.0, 0.9]
    off, on = attack(world, sequence, **over), attack(world, sequence, **over, g_effect={"size": 4})
    assert [(p.step, p.status) for p in on.points] == [
        (0, "running"), (4, "running"), (8, "running"), (6, "running"), (7, "running"), (7, "failed")]
    assert [comparable(p) for p in on.points] == [comparable(p) for p in off.points]
    assert on.trained_steps == off.trained_steps and measured_everywhere(on.points)


def test_an_eval_split_without_responses_measures_the_benign_risk_only(world):
    over = {"data": {"eval": {"source": str(world / "eval.jsonl"), "response_field": None}},
            "utility": {"data": {"source": str(world / "benign_heldout.jsonl")}}, "g_effect": {"size": 4}}
    cfg = AttackConfig.model_validate(attack_dict(world, **over))
    assert cfg.benign_answers == cfg.utility.data  # held out, preferred to data.benign
    model, tokenizer, attack_rows, _ = toy(world)
    probe = GEffectProbe.for_trial(cfg, model, tokenizer, D.load_rows(cfg.data.eval))
    assert list(probe.risks) == [BENIGN]
    assert {k for k in probe.measure(attack_rows) if k != G_EFFECT_SECONDS} == \
        {g_effect(BENIGN, b) for b in [*TOY_BLOCKS, G_TOTAL]}


# --- d: configuration ---------------------------------------------------------------------------

BARE = {"checkpoint": {"model": "m"}, "data": {"attack": {"source": "a.jsonl"}, "eval": {"source": "e.jsonl"}},
        "g_effect": {"size": 4}}


def refusal(raw: dict) -> str:
    with pytest.raises(ValidationError) as err:
        AttackConfig.model_validate(raw)
    msg = err.value.errors()[0]["msg"]
    assert "\n" not in msg and msg.startswith("Value error, g_effect: ")
    return msg


def test_g_effect_is_refused_under_deepspeed_and_without_benign_answers():
    benign = {**BARE, "data": {**BARE["data"], "benign": {"source": "b.jsonl"}}}
    assert AttackConfig.model_validate(benign).g_effect.size == 4
    assert "set g_effect: null or drop deepspeed" in refusal({**benign, "deepspeed": {}})
    assert "set utility.data or data.benign" in refusal(BARE)
    no_answers = {**BARE, "utility": {"data": {"source": "u.jsonl", "response_field": None}, "score": "answered"}}
    assert "set utility.data or data.benign" in refusal(no_answers)
    assert AttackConfig.model_validate({**BARE, "g_effect": None}).g_effect is None
