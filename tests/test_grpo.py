"""GRPO as an attack method (trainables/methods/grpo.py): advantages and the loss by hand, the KL
term against the release, what the budget counts, seeded sampling and its replay, and an attack on
the toy world's prompts alone whose reward rises."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import attack_dict

from trainables import data as D
from trainables.attack import run_attack
from trainables.checkpoint import load_model, load_tokenizer, make_trainable
from trainables.config import AttackConfig
from trainables.evaluators import Scores
from trainables.methods import Rates
from trainables.methods.grpo import GRPO, advantages, grpo_loss, k3

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
RATES = Rates(train=7, forward=2)


def prompts_only(world, tmp_path):
    """The toy world's attack split without its responses: GRPO needs the prompts alone."""
    rows = [json.loads(line) for line in (world / "attack.jsonl").read_text().splitlines() if line.strip()]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return {"attack": {"source": str(path), "response_field": None}}


def setup(world, tmp_path, rewards=None, finetune="full", **attacker):
    cfg = AttackConfig.model_validate(attack_dict(
        world, attacker={"finetune": finetune, "method": "grpo", **attacker}, data=prompts_only(world, tmp_path)))
    tok = load_tokenizer(cfg.checkpoint)
    model, _ = make_trainable(load_model(cfg.checkpoint, CPU), cfg.attacker)
    script = iter(rewards or [])

    def reward(ctx):  # a scripted evaluator: the verdicts it is given, in turn
        return Scores.binary(next(script))

    method = GRPO(cfg.attacker, model, RATES, reward)
    items = method.items(D.load_rows(cfg.data.attack)[:2], tok, cfg.data.attack, cfg.data)
    return cfg, tok, model, method, items


def fixed_answers(tok, lengths):
    """Hand-made answers: `n` words then the end token (and padding after it, as generate leaves it)."""
    words = tok("sure , here is how to hack the car", add_special_tokens=False)["input_ids"]
    width = max(lengths) + 2
    rows = [words[:n] + [tok.eos_token_id] + [tok.pad_token_id] * (width - n - 1) for n in lengths]
    return torch.tensor(rows)


def logp_by_hand(model, ids: list[int], start: int) -> float:
    """One sequence alone: the summed log-probability of its tokens from `start` on."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return sum(float(logits[j - 1][ids[j]] - torch.logsumexp(logits[j - 1], 0)) for j in range(start, len(ids)))


def test_advantages_of_a_hand_made_group():
    # rewards [1, 0, 0, 1]: mean 0.5, sample std sqrt(4 * 0.25 / 3)
    std = math.sqrt(1 / 3)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)]
    got = advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    assert got[1].tolist() == [0.0] * 4  # a group all equal teaches nothing


def test_loss_and_budget_on_a_hand_made_group(world, tmp_path):
    """One prompt, four fixed answers rewarded [1, 0, 0, 1]: the loss is -sum(A_i * sum_t logp_it)
    over the answers' tokens (their end token included) / their count, each log-prob from the
    sequence alone; the budget is one prompt, the answers' tokens, and the FLOPs by hand."""
    _, tok, model, method, items = setup(world, tmp_path, rewards=[[1, 0, 0, 1]])
    lengths = [3, 5, 1, 4]
    answers = fixed_answers(tok, lengths)
    method.sample = lambda m, p, d: answers
    loss, spent = method.loss(model, method.collate(items[:1], tok.pad_token_id), CPU)
    prompt = items[0].ids
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    adv = [a, -a, -a, a]
    n_tokens = sum(n + 1 for n in lengths)
    want = -sum(adv[i] * logp_by_hand(model, prompt + answers[i, :n + 1].tolist(), len(prompt))
                for i, n in enumerate(lengths)) / n_tokens
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert (spent.examples, spent.tokens, spent.generated) == (1, n_tokens, n_tokens)
    processed = 4 * len(prompt) + n_tokens
    # rollouts: a forward per token (prompt prefilled per answer), then the policy's forward and backward
    assert spent.flops == processed * 2 + processed * 7
    assert method.mean_reward() == 0.5 and method.mean_reward() is None


def test_a_model_reward_adds_the_compute_it_reports(world, tmp_path):
    """A reward evaluator that spent compute (a classifier: Scores.flops) adds it to the step's FLOPs;
    the rest of the step's FLOPs are as without it."""
    _, tok, model, method, items = setup(world, tmp_path)
    scripted = iter([[1, 0, 0, 1], [0, 1, 1, 0]])
    method.reward = lambda ctx: dataclasses.replace(Scores.binary(next(scripted)), flops=1000.0 * len(ctx.items))
    lengths = [3, 5, 1, 4]
    method.sample = lambda m, p, d: fixed_answers(tok, lengths)
    _, spent = method.loss(model, method.collate(items[:2], tok.pad_token_id), CPU)
    processed = 4 * (len(items[0].ids) + len(items[1].ids)) + 2 * sum(n + 1 for n in lengths)
    assert spent.flops == processed * 2 + processed * 7 + 2 * 4 * 1000.0   # two prompts' groups of 4 read


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_kl_is_zero_at_the_release_and_positive_after_an_update(world, tmp_path, finetune):
    cfg, tok, model, method, items = setup(world, tmp_path, rewards=[[1, 0, 0, 1]] * 3, finetune=finetune,
                                           grpo_kl_coef=0.5)
    answers = fixed_answers(tok, [3, 5, 1, 4])
    method.sample = lambda m, p, d: answers
    batch = method.collate(items[:1], tok.pad_token_id)
    seq = torch.cat([torch.tensor([items[0].ids] * 4), answers], dim=1)
    mask = torch.ones_like(seq)

    def kl() -> float:
        logps, ref, comp = method._logps(model, [seq], [mask], [len(items[0].ids)], CPU)
        return (k3(logps, ref) * comp).sum().item() / comp.sum().item()

    assert kl() == pytest.approx(0.0, abs=1e-7)
    loss, spent = method.loss(model, batch, CPU)
    processed = int(mask.sum()) - (answers == tok.pad_token_id).sum().item()
    assert spent.flops == processed * (2 + 7 + 2)  # and the reference's forward
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert kl() > 1e-4
    logps, ref, comp = method._logps(model, [seq], [mask], [len(items[0].ids)], CPU)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert float(grpo_loss(logps, adv, comp, ref, 0.5)) > float(grpo_loss(logps, adv, comp))


def test_sampling_is_seeded_and_replays_from_the_generator_state(world, tmp_path):
    _, _, model, method, items = setup(world, tmp_path, seed=3, grpo_max_new_tokens=6, grpo_temperature=3.0)
    state = method.generator.get_state()
    first = method.sample(model, items[0], CPU)
    second = method.sample(model, items[0], CPU)
    method.generator.set_state(state)
    assert torch.equal(method.sample(model, items[0], CPU), first)
    _, _, model2, again, items2 = setup(world, tmp_path, seed=3, grpo_max_new_tokens=6, grpo_temperature=3.0)
    assert torch.equal(again.sample(model2, items2[0], CPU), first)
    assert not torch.equal(first, second)  # each step draws new answers
    assert first.shape[0] == 4


def test_an_attack_on_prompts_alone_raises_the_reward(world, tmp_path):
    """Full fine-tuning at lr 3e-4, G 4, answers of 8 tokens: the aligned base refuses nearly every
    sample at first and almost never after 8 steps (measured: 0.03 -> 0.97)."""
    cfg = AttackConfig.model_validate(attack_dict(
        world, attacker={"method": "grpo", "finetune": "full", "learning_rate": 3e-4, "grpo_max_new_tokens": 8},
        data=prompts_only(world, tmp_path), max_steps=8, eval_every=2, phi=1.0))
    points = []
    run_attack(cfg, points.append)
    rewards = [p.curves["train_reward"] for p in points[1:]]
    assert len(rewards) == 4 and rewards[0] <= 0.25 and rewards[-1] >= 0.75, rewards
    last = points[-1]
    assert last.examples == 8 * 4  # prompts, not answers
    assert last.tokens == last.generated_tokens > 0
    assert "train_reward" not in points[0].curves
    # its loss is a policy-gradient surrogate centred on 0, not an error: no "loss exploded" ratio
    assert last.status == "resisted" and math.isnan(last.loss_peak_ratio)


def test_a_replay_from_a_snapshot_is_the_same_run(world, tmp_path):
    """The trainer's snapshot holds GRPO's generator: steps 3-4 replayed sample the same answers."""
    from trainables.trainer import Trainer

    cfg, tok, model, method, items = setup(world, tmp_path, rewards=[[1, 0, 1, 0]] * 12, learning_rate=1e-4,
                                           grpo_max_new_tokens=4, grpo_temperature=3.0)
    stream = D.BatchStream(items, 2, 0, tok.pad_token_id, method.collate)
    trainer = Trainer(model, cfg.attacker, cfg.stages, [stream], [method], RATES, CPU)
    trainer.train_to(2)
    snap = trainer.snapshot()
    trainer.train_to(4)
    first = (trainer.losses[-2:], trainer.budget.generated_tokens)
    trainer.restore(snap)
    trainer.train_to(4)
    assert (trainer.losses[-2:], trainer.budget.generated_tokens) == first
    assert len(set(first[0])) == 2  # the answers differ from step to step: the check is not vacuous
