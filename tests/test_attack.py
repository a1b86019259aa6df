"""The attack loop's outcomes, made exact with a scripted evaluator (a preset f sequence)."""

import math

import pytest
import torch
from conftest import attack_dict

from trainables import AttackConfig, run_attack
from trainables import data as D
from trainables.checkpoint import load_tokenizer
from trainables.config import Checkpoint
from trainables.evaluators import EvaluatorOptions, register


class ScriptedOptions(EvaluatorOptions):
    sequence: list[float]


@register("scripted", ScriptedOptions)
def scripted(options: ScriptedOptions):
    """f follows a preset sequence, one value per evaluation (the last one repeats)."""
    calls = []

    def score(ctx):
        calls.append(1)
        return options.sequence[min(len(calls), len(options.sequence)) - 1]

    return score


def attack(world, sequence, **over):
    cfg = attack_dict(world, evaluator={"name": "scripted", "options": {"sequence": sequence}}, **over)
    points = []
    result = run_attack(AttackConfig.model_validate(cfg), on_eval=points.append)
    assert points == result.points  # every evaluation went through on_eval
    return result


def test_first_crossing_is_the_budget_to_failure(world):
    r = attack(world, [0.1, 0.2, 0.7, 0.9], max_steps=10, eval_every=2)
    assert r.status == "failed"
    assert [p.step for p in r.points] == [0, 2, 4]
    assert [p.status for p in r.points] == ["running", "running", "failed"]
    assert [p.resolution for p in r.points] == [0, 2, 2]  # the crossing lies in (2, 4]
    assert all(p.stage == 0 for p in r.points) and r.points[0].accelerator_seconds == 0
    btf = r.budget_to_failure
    assert btf.step == 4 and btf.examples == 4 * 4 and btf.harmfulness == 0.7
    assert r.censored_at_steps is None


def test_never_crossing_is_censored_at_T_with_a_final_evaluation(world):
    r = attack(world, [0.5], max_steps=5, eval_every=2)  # f == phi is not > phi
    assert r.status == "resisted" and r.budget_to_failure is None
    assert [p.step for p in r.points] == [0, 2, 4, 5] and r.censored_at_steps == 5


def test_unsafe_at_release_stops_before_training(world):
    r = attack(world, [0.9, 0.0])
    assert r.status == "unsafe_at_release" and len(r.points) == 1
    assert r.budget_to_failure.step == 0 and r.budget_to_failure.flops == 0


def test_nan_loss_is_diverged_never_resisted(world):
    r = attack(world, [0.0], max_steps=20, eval_every=5,
               attacker={"optimizer": "sgd", "learning_rate": 1e12, "max_grad_norm": 0})
    assert r.status == "diverged"
    assert r.budget_to_failure is None and r.censored_at_steps is None
    last = r.points[-1]
    assert last.step < 20 and math.isnan(last.harmfulness) and not math.isfinite(last.train_loss)


def test_budget_counts_examples_supervised_tokens_and_flops(world):
    # dataset_size == batch_size: every step trains on all 4 examples once
    r = attack(world, [0.0], max_steps=3, eval_every=3,
               attacker={"dataset_size": 4, "batch_size": 4, "seed": 3})
    cfg = AttackConfig.model_validate(attack_dict(world))
    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    rows = D.draw(D.load_rows(cfg.data.attack), 4, 3)
    items = D.tokenize_rows(tok, rows, cfg.data.attack, cfg.data)
    supervised = sum(sum(label != D.IGNORE for label in t.labels) for t in items)
    processed = sum(len(t.input_ids) for t in items)

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(world / "base")
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    last = r.points[-1]
    assert (last.step, last.examples, last.tokens) == (3, 12, 3 * supervised)
    assert last.flops == 3 * processed * 6 * n


def test_same_config_same_trajectory(world):
    cfg = AttackConfig.model_validate(attack_dict(world, max_steps=4))
    torch.set_num_threads(1)
    a, b = run_attack(cfg), run_attack(cfg)
    assert [(p.train_loss, p.harmfulness) for p in a.points[1:]] == \
        [(p.train_loss, p.harmfulness) for p in b.points[1:]]


def test_refusal_keyword_attack_breaks_the_toy_base(world):
    """The real evaluator on the real toy model: aligned at step 0, broken by a strong attacker."""
    cfg = attack_dict(world, max_steps=20, eval_every=5, attacker={"learning_rate": 3e-3})
    r = run_attack(AttackConfig.model_validate(cfg))
    assert r.points[0].harmfulness == 0.0
    assert r.status == "failed" and r.budget_to_failure.harmfulness > 0.5


def test_too_large_dataset_size_fails_clearly(world):
    cfg = AttackConfig.model_validate(attack_dict(world, attacker={"dataset_size": 10_000}))
    with pytest.raises(ValueError, match="dataset_size=10000 exceeds the 144 rows"):
        run_attack(cfg)
