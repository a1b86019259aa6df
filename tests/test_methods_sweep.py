"""method as an attacker dimension, end to end: a real local Ray sweep over sft, dpo and grpo on the toy
world's rescaled defence, recorded in a real MLflow sqlite store, and a TPE search over method."""

import pytest
import torch
from conftest import sweep_dict, trial_runs

from orchestrator import spec as S
from orchestrator import sweep
from orchestrator.spec.toyworld import REFUSAL
from trainables.checkpoint import load_model, load_tokenizer, matmul_params
from trainables.config import Checkpoint


def spec_of(world, name, **over):
    raw = sweep_dict(world, name, defences=("rescaled",), max_steps=10, **over)
    raw["data"]["refusal"] = REFUSAL  # as the toy world's aligned models refuse
    return S.from_dict(raw)


@pytest.fixture(scope="module")
def grid(world, ray_local, tmp_path_factory):
    """sft, dpo and grpo at one learning rate that breaks the rescaled defence by step 5 (sft, dpo)."""
    tmp = tmp_path_factory.mktemp("methods")
    spec = spec_of(world, "methods", space={"dataset_size": 32, "learning_rate": 3e-3, "grpo_max_new_tokens": 8,
                                            "method": {"grid": ["sft", "dpo", "grpo"]}})
    uri = f"sqlite:///{tmp}/mlflow.db"
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lambda _: None)
    return {r.data.params["method"]: r for r in trial_runs(uri, spec.name)}


def test_each_method_is_a_trial_with_its_method_as_a_param(grid):
    assert set(grid) == {"sft", "dpo", "grpo"}
    for run in (grid["sft"], grid["dpo"]):
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "failed"
        assert run.data.metrics["budget_to_failure_steps"] == 5  # f crossed phi at the first evaluation


def test_dpo_budget_counts_pairs_both_responses_and_the_reference(world, grid):
    """By hand from the sft trial, which draws the same rows in the same batches: 5 steps of 8 rows.
    DPO's tokens add each refusal (its words and the end token); its processed tokens add each
    rejected sequence (the prompt again and the refusal), each costing a forward and backward (6N)
    and the reference's forward (2N)."""
    sft, dpo = (grid[m].data.metrics for m in ("sft", "dpo"))
    refusal = len(load_tokenizer(Checkpoint(model=str(world / "rescaled")))(REFUSAL, add_special_tokens=False)
                  ["input_ids"]) + 1
    assert sft["budget_to_failure_examples"] == dpo["budget_to_failure_examples"] == 5 * 8  # rows / pairs
    assert dpo["budget_to_failure_tokens"] == sft["budget_to_failure_tokens"] + 5 * 8 * refusal
    n = matmul_params(load_model(Checkpoint(model=str(world / "rescaled")), torch.device("cpu")))
    processed_sft = sft["budget_to_failure_flops"] / (6 * n)
    prompts = processed_sft - sft["budget_to_failure_tokens"]
    processed_dpo = processed_sft + prompts + 5 * 8 * refusal
    assert dpo["budget_to_failure_flops"] == pytest.approx(processed_dpo * 8 * n, rel=1e-12)


def test_grpo_budget_counts_prompts_sampled_tokens_and_rollouts(world, grid):
    """By hand from the sft trial, which draws the same rows in the same batches (measured: GRPO
    also crosses at step 5): examples are the 5 x 8 prompts; tokens are all generated (SFT's and
    DPO's none); FLOPs are each prompt read G = 4 times and every sampled token, at 2N for the
    rollout and 6N for the policy's forward and backward (no KL: no reference)."""
    grpo, sft = grid["grpo"].data.metrics, grid["sft"].data.metrics
    assert grid["grpo"].data.tags["status"] == "failed" and grpo["budget_to_failure_steps"] == 5
    assert grpo["budget_to_failure_examples"] == 5 * 8
    assert grpo["tokens"] == grpo["generated_tokens"] == grpo["budget_to_failure_tokens"] > 0
    n = matmul_params(load_model(Checkpoint(model=str(world / "rescaled")), torch.device("cpu")))
    prompts = sft["budget_to_failure_flops"] / (6 * n) - sft["budget_to_failure_tokens"]
    assert grpo["budget_to_failure_flops"] == pytest.approx((4 * prompts + grpo["tokens"]) * 8 * n, rel=1e-12)
    assert 0.0 <= grpo["train_reward"] <= 1.0
    assert sft["generated_tokens"] == 0 and "train_reward" not in sft


def test_tpe_searches_over_method(world, ray_local, tmp_path):
    spec = spec_of(world, "methods-tpe", search={"algorithm": "tpe", "num_samples": 3, "n_initial": 2,
                                                 "max_concurrent": 1, "seed": 0},
                   space={"dataset_size": 32, "learning_rate": {"loguniform": [1e-4, 3e-3]},
                          "method": {"choice": ["sft", "dpo"]}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lambda _: None)
    runs = trial_runs(uri, spec.name)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["method"] for r in runs} <= {"sft", "dpo"}
    assert all(r.data.tags["status"] in ("failed", "resisted") for r in runs)

