"""Optimizers, learning-rate schedules and the budget's units."""

import math
import sys
import time

import pytest
import torch
from conftest import attack_dict
from test_attack import attack

from trainables import data as D
from trainables.budget import Budget
from trainables.checkpoint import load_tokenizer
from trainables.config import AttackConfig, Attacker, Optimizer
from trainables.evaluators import EvaluatorOptions, register
from trainables.optim import build_optimizer, evaluating, lr_factor, missing_dependency, warmup_length


@pytest.mark.parametrize("name", Optimizer.__args__)
def test_every_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = build_optimizer(layer.parameters(), Attacker(optimizer=name, learning_rate=0.1, weight_decay=0.01))
    for _ in range(2):
        layer(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def _updates(name: str, steps: int, lr: float = 0.1, wd: float = 0.0, w0: float = 0.0) -> list[float]:
    """The change of one weight at each of `steps` steps on the linear loss g·w with g = 1 (a
    constant gradient), from w0: what the optimizer's rule alone makes of it."""
    w = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = build_optimizer([w], Attacker(optimizer=name, learning_rate=lr, weight_decay=wd))
    out = []
    for _ in range(steps):
        before = float(w.detach())
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        out.append(float(w.detach()) - before)
    return out


@pytest.mark.parametrize("name, expect", [
    ("sgd", [-0.1, -0.1, -0.1]),
    # heavy ball, momentum 0.9: buffer 1, 1.9, 2.71 (b <- 0.9 b + g)
    ("sgd_momentum", [-0.1, -0.19, -0.271]),
    # Nesterov: the step is g + 0.9 b with b as above: 1.9, 2.71, 3.439
    ("sgd_nesterov", [-0.19, -0.271, -0.3439]),
    # Adam / AdamW with a constant gradient: m_hat = v_hat = 1, so each step is lr / (1 + 1e-8)
    ("adam", [-0.1 / (1 + 1e-8)] * 3),
    ("adamw", [-0.1 / (1 + 1e-8)] * 3),
    # Adagrad: the sum of squares grows 1, 2, 3: steps lr / (sqrt(k) + 1e-10)
    ("adagrad", [-0.1 / (1 + 1e-10), -0.1 / (math.sqrt(2) + 1e-10), -0.1 / (math.sqrt(3) + 1e-10)]),
    # Adadelta (rho 0.9, eps 1e-6): v = 0.1 g^2; delta = sqrt(u + eps) / sqrt(v + eps) g; u <- 0.9 u + 0.1 delta^2
    ("adadelta", None),
])
def test_each_optimizer_follows_its_update_rule(name, expect):
    if expect is None:  # Adadelta's recursion, by hand
        expect, v, u = [], 0.0, 0.0
        for _ in range(3):
            v = 0.9 * v + 0.1
            delta = math.sqrt(u + 1e-6) / math.sqrt(v + 1e-6)
            u = 0.9 * u + 0.1 * delta**2
            expect.append(-0.1 * delta)
    assert _updates(name, 3) == pytest.approx(expect, rel=1e-9, abs=1e-15)


def test_weight_decay_is_coupled_for_adam_and_decoupled_for_adamw():
    """From w = 1 with g = 1 and weight decay 0.5 at lr 0.1: Adam adds 0.5 w to the gradient (its
    normalised step is still lr), AdamW shrinks w by lr * 0.5 * w first, then takes the step lr."""
    assert _updates("adam", 1, wd=0.5, w0=1.0) == pytest.approx([-0.1 / (1 + 1e-8 / 1.5)])
    assert _updates("adamw", 1, wd=0.5, w0=1.0) == pytest.approx([-0.1 * 0.5 - 0.1 / (1 + 1e-8)])
    assert _updates("sgd", 1, wd=0.5, w0=1.0) == pytest.approx([-0.1 * 1.5])


def test_schedule_free_evaluates_at_its_average_and_trains_on():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = build_optimizer(layer.parameters(), Attacker(optimizer="schedule_free_adamw", learning_rate=0.1))
    for _ in range(3):
        layer(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    y = layer.weight.detach().clone()
    with evaluating(opt):
        assert not opt.param_groups[0]["train_mode"] and not torch.allclose(layer.weight, y)
    assert opt.param_groups[0]["train_mode"] and torch.allclose(layer.weight, y)
    layer(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()  # would raise if evaluating had left it in eval mode


def test_schedule_free_attack_runs_through_evaluations(world):
    r = attack(world, [0.0], max_steps=4, eval_every=2, attacker={"optimizer": "schedule_free_adamw"})
    assert r.status == "resisted" and [p.step for p in r.points] == [0, 2, 4]


def test_missing_schedulefree_is_a_clear_error(monkeypatch):
    assert missing_dependency("schedule_free_adamw") is None and missing_dependency("adamw") is None
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # what an uninstalled package looks like
    msg = "optimizer schedule_free_adamw needs the schedulefree package: pip install schedulefree"
    assert missing_dependency("schedule_free_adamw") == msg
    with pytest.raises(ValueError, match=msg):
        build_optimizer(torch.nn.Linear(2, 2).parameters(), Attacker(optimizer="schedule_free_adamw"))


def test_sgdr_restarts_at_full_lr_every_period():
    atk = Attacker(lr_schedule="sgdr", sgdr_period=5, warmup_steps=2)
    f = [lr_factor(s, atk, 22) for s in range(22)]
    assert f[:2] == [0.5, 1.0]
    assert [s for s in range(2, 22) if f[s] == 1.0] == [2, 7, 12, 17]
    assert all(f[s] > f[s + 1] > 0 for s in range(2, 6))  # cosine down within a period
    default = Attacker(lr_schedule="sgdr")  # period: a quarter of the horizon
    assert [s for s in range(40) if lr_factor(s, default, 40) == 1.0] == [0, 10, 20, 30]


def test_warmup_ratio_sets_the_warmup_length():
    atk = Attacker(warmup_ratio=0.1, lr_schedule="linear")
    assert warmup_length(atk, 50) == 5 and warmup_length(atk.model_copy(update={"warmup_steps": 8}), 50) == 8
    assert [lr_factor(s, atk, 50) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert lr_factor(49, atk, 50) == pytest.approx(1 / 45)  # then linear to 0 over the remaining 45


def test_flops_units_for_full_and_lora(world):
    cfg = AttackConfig.model_validate(attack_dict(world))
    tok = load_tokenizer(cfg.checkpoint)
    rows = D.draw(D.load_rows(cfg.data.attack), 4, 0)
    processed = sum(len(t.input_ids) for t in D.tokenize_rows(tok, rows, cfg.data.attack, cfg.data))
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "base")
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    c = AutoConfig.from_pretrained(world / "base")
    r = 4  # adapters on q_proj (hidden -> heads*head_dim) and v_proj (hidden -> kv_heads*head_dim)
    n_lora = c.num_hidden_layers * r * (2 * c.hidden_size + (c.num_attention_heads + c.num_key_value_heads)
                                        * c.head_dim)

    small = {"dataset_size": 4, "batch_size": 4}  # one step trains on all 4 examples
    full = attack(world, [0.0], max_steps=1, attacker=small).points[-1]
    lora = attack(world, [0.0], max_steps=1, attacker={**small, "finetune": "lora", "lora_r": r,
                                                        "lora_target_modules": ["q_proj", "v_proj"]}).points[-1]
    assert full.flops == 6 * n * processed
    assert lora.flops == (4 * n + 6 * n_lora) * processed


class SleepyOptions(EvaluatorOptions):
    seconds: float


@register("sleepy", SleepyOptions)
def sleepy(options: SleepyOptions):
    def score(ctx):
        time.sleep(options.seconds)
        return 0.0
    return score


def test_accelerator_seconds_count_training_only(world):
    cfg = attack_dict(world, evaluator={"name": "sleepy", "options": {"seconds": 0.25}}, max_steps=3, eval_every=1)
    from trainables import run_attack

    last = run_attack(AttackConfig.model_validate(cfg)).points[-1]  # 4 evaluations: 1 s asleep
    assert last.accelerator_seconds > 0 and last.wall_seconds - last.accelerator_seconds >= 1.0

    budget = Budget()
    budget.add_time(1.5, devices=4)
    assert budget.accelerator_seconds == 6.0  # device-seconds
