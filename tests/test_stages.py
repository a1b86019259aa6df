"""Multi-stage attackers: one model through several fine-tuning runs, budget counted across."""

import pytest
import torch
from conftest import attack_dict
from pydantic import ValidationError
from test_attack import attack

from trainables import data as D
from trainables.checkpoint import load_tokenizer
from trainables.config import AttackConfig, Attacker, Stage
from trainables.evaluators import register

BENIGN_THEN_HARMFUL = [{"name": "benign", "steps": 3, "data": "benign", "batch_size": 2},
                       {"name": "harmful", "steps": 5, "batch_size": 4}]


def with_benign(world) -> dict:
    return {"benign": {"source": str(world / "benign.jsonl")}}


def supervised_per_batch(world, split: str, batch_size: int) -> list[int]:
    """Response tokens in each of the first 8 batches of a split's stream, drawn as the attack draws."""
    cfg = AttackConfig.model_validate(attack_dict(world, data=with_benign(world)))
    src = cfg.data.benign if split == "benign" else cfg.data.attack
    tok = load_tokenizer(cfg.checkpoint)
    rows = D.draw(D.load_rows(src), cfg.attacker.dataset_size, cfg.attacker.seed)
    stream = D.BatchStream(D.tokenize_rows(tok, rows, src, cfg.data), batch_size, 0, tok.pad_token_id)
    return [int((stream[i]["labels"][:, 1:] != D.IGNORE).sum()) for i in range(8)]


def test_budget_counts_across_stages_with_global_steps(world):
    r = attack(world, [0.0], eval_every=2, data=with_benign(world), attacker={"stages": BENIGN_THEN_HARMFUL})
    assert r.status == "resisted" and r.censored_at_steps == 8  # the horizon: 3 + 5 steps
    assert [p.step for p in r.points] == [0, 2, 3, 4, 6, 8]  # step 3 ends stage 0
    assert [p.stage for p in r.points] == [0, 0, 0, 1, 1, 1]
    benign_tokens, harmful_tokens = supervised_per_batch(world, "benign", 2), supervised_per_batch(world, "attack", 4)
    for p in r.points:
        benign, harmful = min(p.step, 3), max(0, p.step - 3)
        assert p.examples == 2 * benign + 4 * harmful
        assert p.tokens == sum(benign_tokens[:benign]) + sum(harmful_tokens[:harmful])
    assert all(a.flops < b.flops for a, b in zip(r.points, r.points[1:], strict=False))


def test_a_crossing_in_the_first_stage_stops_the_attack(world):
    r = attack(world, [0.0, 0.9], eval_every=2, data=with_benign(world), attacker={"stages": BENIGN_THEN_HARMFUL})
    assert r.status == "failed" and [p.step for p in r.points] == [0, 2]
    assert r.budget_to_failure.stage == 0 and r.budget_to_failure.examples == 4


def test_every_stage_end_is_evaluated(world):
    r = attack(world, [0.0], eval_every=100, data=with_benign(world), attacker={"stages": BENIGN_THEN_HARMFUL})
    assert [(p.step, p.stage) for p in r.points] == [(0, 0), (3, 0), (8, 1)]


SEEN: list[torch.Tensor] = []


@register("weights_probe")
def weights_probe(options):
    """f = 0, keeping a copy of every weight at each evaluation."""
    def score(ctx):
        SEEN.append(torch.cat([p.detach().flatten().clone() for p in ctx.model.parameters()]))
        return 0.0
    return score


def test_optimizer_switch_trains_in_both_stages(world):
    SEEN.clear()
    stages = [{"steps": 3, "optimizer": "adamw"}, {"steps": 3, "optimizer": "sgd", "learning_rate": 0.5}]
    cfg = AttackConfig.model_validate(attack_dict(world, evaluator={"name": "weights_probe", "options": {}},
                                                  eval_every=100, attacker={"stages": stages}))
    assert [s.resolved(cfg.attacker).optimizer for s in cfg.stages] == ["adamw", "sgd"]
    from trainables import run_attack
    assert run_attack(cfg).status == "resisted"
    start, after_adamw, after_sgd = SEEN  # steps 0, 3, 6
    assert not torch.equal(start, after_adamw) and not torch.equal(after_adamw, after_sgd)


def test_stage_overrides_inherit_the_rest():
    atk = Attacker(learning_rate=1e-4, optimizer="adam", batch_size=8, warmup_ratio=0.1,
                   stages=[Stage(steps=10, optimizer="sgd", batch_size=2)])
    hp = atk.stages[0].resolved(atk)
    assert (hp.optimizer, hp.batch_size, hp.learning_rate, hp.warmup_ratio) == ("sgd", 2, 1e-4, 0.1)
    assert hp.steps == 10 and hp.stages is None


def test_horizon_is_the_stages_sum_else_the_attackers_steps_else_max_steps(world):
    def horizon(**attacker):
        return AttackConfig.model_validate(attack_dict(world, max_steps=6, attacker=attacker)).horizon

    assert horizon() == 6 and horizon(steps=9) == 9
    assert horizon(steps=9, stages=[{"steps": 2}, {"steps": 5}]) == 7
    assert attack(world, [0.0], eval_every=10, attacker={"steps": 9}).censored_at_steps == 9


def test_benign_stage_needs_benign_data(world):
    with pytest.raises(ValidationError, match="data.benign is not set"):
        AttackConfig.model_validate(attack_dict(world, attacker={"stages": BENIGN_THEN_HARMFUL}))
    with pytest.raises(ValidationError, match="stages"):
        Attacker(stages=[])
