"""Budget accounting by hand (trainables/budget.py: what a step adds, the FLOPs per token, the flat
record of a point) and the searcher's objective and progress (orchestrator/sweep/adversary.py): fast, no
model. Mutation testing (mutmut) runs against these tests."""

import json
import math

import pytest

from orchestrator.sweep.adversary import Progress, objective
from trainables import data as D
from trainables.budget import Budget, EvalPoint, flops_per_token
from trainables.methods import sft
from trainables.methods.base import Spent


def test_flops_per_token_full_and_lora():
    assert flops_per_token(10, None) == 60                   # 6N: forward 2N, backward 4N
    assert flops_per_token(10, 3) == 4 * 10 + 6 * 3 == 58     # 4N + 6N_lora
    assert flops_per_token(10, 0) == 40                      # no adapters is not full fine-tuning


def test_each_step_adds_what_its_method_spent():
    b = Budget()
    assert (b.steps, b.examples, b.tokens, b.flops, b.accelerator_seconds) == (0, 0, 0, 0.0, 0.0)
    b.spend(Spent(4, 30, 3000.0))
    b.spend(Spent(2, 20, 2400.0))
    assert (b.steps, b.examples, b.tokens) == (2, 6, 50)
    assert b.flops == 3000.0 + 2400.0 == 5400.0 and isinstance(b.flops, float)
    assert b.accelerator_seconds == 0.0                      # time is added apart (add_time)


def test_sft_counts_rows_supervised_tokens_and_processed_flops():
    import torch

    ig = D.IGNORE  # two rows, right-padded: 5 and 3 real tokens, responses of 2 and 1 tokens
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[ig, ig, ig, 4, 5], [ig, ig, 3, ig, ig]])}
    s = sft.spent(batch, 60)
    assert (s.examples, s.tokens, s.generated) == (2, 3, 0)
    assert s.flops == (5 + 3) * 60 == 480.0 and isinstance(s.flops, float)


def test_training_time_counts_every_device():
    b = Budget()
    b.add_time(1.5)                                          # the single-process loop: 1 device
    assert b.accelerator_seconds == 1.5
    b.add_time(2.0, devices=4)
    assert b.accelerator_seconds == 1.5 + 4 * 2.0 == 9.5
    assert (b.steps, b.examples, b.tokens, b.flops) == (0, 0, 0, 0.0)


FIELDS = dict(step=3, examples=12, tokens=90, flops=5400.0, accelerator_seconds=1.5, wall_seconds=2.0,
              train_loss=0.7, harmfulness=0.25, status="running", resolution=3, stage=1, world_size=2,
              safe=True, harmfulness_lo=0.125, harmfulness_hi=0.5, utility=0.75, eval_seconds=0.5,
              loss_peak_ratio=1.25, generated_tokens=0, incoherent_crossing=4.0)


def test_a_point_flattens_curves_crossings_and_samples():
    samples = [{"prompt": "p", "response": "r", "verdicts": {"kw": 1.0}}]
    p = EvalPoint(**FIELDS, curves={"harmfulness.judge": 0.5, "mean_score.judge": 3.0},
                  crossings={"judge": {"step": 2.0, "resolution": 1.0}, "kw": {"tokens": 60.0}},
                  samples=samples)
    assert p.as_dict() == {**FIELDS, "harmfulness.judge": 0.5, "mean_score.judge": 3.0,
                           "crossing.judge.step": 2.0, "crossing.judge.resolution": 1.0,
                           "crossing.kw.tokens": 60.0, "samples": json.dumps(samples)}
    assert json.loads(p.as_dict()["samples"]) == samples


def test_a_point_without_extras_is_its_fields():
    assert EvalPoint(**FIELDS).as_dict() == FIELDS            # no samples key where none were kept


def record(status: str, step: int, tokens: int) -> dict:
    return {"status": status, "step": step, "examples": 8 * step, "tokens": tokens, "flops": 1e6 * step,
            "accelerator_seconds": 0.5 * step}


@pytest.mark.parametrize("status", ["failed", "unsafe_at_release"])
def test_a_success_scores_its_budget_in_the_unit(status):
    r = record(status, 10, 300)
    assert [objective(r, unit, 2.0, 40) for unit in ("steps", "examples", "tokens", "flops",
                                                      "accelerator_seconds")] == [10, 80, 300, 1e7, 5.0]
    assert objective(record(status, 0, 0), "tokens", 2.0, 40) == 0.0


@pytest.mark.parametrize("status", ["resisted", "diverged", "degenerate", "pruned", "running"])
def test_any_other_status_scores_penalty_times_t_max_times_its_budget_per_step(status):
    r = record(status, 20, 600)
    # penalty x T_max x (budget / steps): 2.5 x 40 x 30 tokens per step
    assert objective(r, "tokens", 2.5, 40) == 2.5 * 40 * 30 == 3000.0
    assert objective(r, "steps", 2.5, 40) == 2.5 * 40 * 1 == 100.0
    assert objective(r, "accelerator_seconds", 3.0, 10) == 3.0 * 10 * 0.5 == 15.0


def test_a_penalty_at_step_0_is_zero():
    assert objective(record("running", 0, 0), "tokens", 2.0, 40) == 0.0   # provisional, nothing spent


def test_progress_counts_every_trial_and_keeps_the_cheapest_success():
    p = Progress("tokens")
    assert (p.trials, p.compute, p.best) == (0, 0.0, math.inf)
    p.add("resisted", 20.0, None)
    assert (p.trials, p.compute, p.best) == (1, 20.0, math.inf)
    p.add("failed", 15.0, 15.0)
    p.add("degenerate", 4.0, 3.0)                            # crossed by breaking the model: no success
    p.add("failed", 20.0, 20.0)                              # dearer than the best: the best stays
    p.add("failed", 7.0, None)                               # no budget-to-failure: nothing to compare
    assert (p.trials, p.compute, p.best) == (5, 66.0, 15.0)
    p.add("unsafe_at_release", 0.0, 0.0)
    assert (p.trials, p.compute, p.best) == (6, 66.0, 0.0)


def test_spend_adds_each_steps_units_generated_tokens_apart():
    """Two steps, by hand: each unit is the sum of what the steps spent (GRPO's sampled tokens kept apart)."""
    from trainables.methods.base import Spent

    b = Budget()
    b.spend(Spent(examples=2, tokens=10, flops=100.0, generated=3))
    b.spend(Spent(examples=4, tokens=20, flops=50.0, generated=5))
    assert (b.steps, b.examples, b.tokens, b.flops, b.generated_tokens) == (2, 6, 30, 150.0, 8)
