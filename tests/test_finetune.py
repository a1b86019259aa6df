"""LoRA versus full fine-tuning: LoRA must leave every base weight as released."""

import torch
from conftest import attack_dict

from trainables import data as D
from trainables.checkpoint import load_model, load_tokenizer, make_trainable
from trainables.config import AttackConfig
from trainables.optim import build_optimizer


def train_a_few_steps(world, finetune: str):
    cfg = AttackConfig.model_validate(attack_dict(world, attacker={
        "finetune": finetune, "learning_rate": 1e-2, "lora_target_modules": ["q_proj", "v_proj"]}))
    tok = load_tokenizer(cfg.checkpoint)
    model = load_model(cfg.checkpoint, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, n_lora = make_trainable(model, cfg.attacker)
    rows = D.draw(D.load_rows(cfg.data.attack), 8, 0)
    stream = D.batches(D.tokenize_rows(tok, rows, cfg.data.attack, cfg.data), 4, 0, tok.pad_token_id)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.attacker)
    for _ in range(3):
        model(**next(stream)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, before, n_lora


def test_lora_leaves_base_weights_unchanged(world):
    model, before, n_lora = train_a_few_steps(world, "lora")
    base = model.get_base_model()
    after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    lora = {k: v for k, v in model.named_parameters() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the adapters did train
    assert n_lora == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # only the named targets got adapters
    assert {k.split(".lora_B")[0].split(".")[-1] for k in lora} == {"q_proj", "v_proj"}


def test_full_finetuning_changes_base_weights(world):
    model, before, n_lora = train_a_few_steps(world, "full")
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert n_lora is None
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
