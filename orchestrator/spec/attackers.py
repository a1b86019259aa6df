"""How an attacker reads: its label in printed lines, its MLflow run name, and the params its
trial run logs (only those that apply to it)."""

from __future__ import annotations

from typing import Any


def label(attacker: dict[str, Any], varying: list[str]) -> str:
    """A short name for an attacker from the fields that vary in this sweep ('lr 3e-3 adamw n32
    full'), as its run name has it after the defence."""
    return " ".join(_words(attacker, varying)) or "(single attacker)"


def _fmt(v: Any) -> str:
    if isinstance(v, list) and v and isinstance(v[0], dict):  # stages
        return "+".join(s.get("name") or f"{s['data']}x{s['steps']}" for s in v)
    return f"{v:.3g}" if isinstance(v, float) else str(v)


SHORT: dict[str, str] = {
    "learning_rate": "lr {}", "optimizer": "{}", "weight_decay": "wd {}", "dataset_size": "n{}", "finetune": "{}",
    "lora_r": "r{}", "lora_alpha": "alpha {}", "lora_dropout": "lora-dropout {}", "lora_target_modules": "{}",
    "batch_size": "bs{}", "warmup_steps": "warmup {}", "warmup_ratio": "warmup {}T", "lr_schedule": "{}",
    "sgdr_period": "sgdr {}", "max_grad_norm": "clip {}", "seed": "seed {}", "attack_domain": "on {}", "steps": "T{}",
    "stages": "{}",
    "poison_ratio": "poison {}", "chat_template": "template={}", "prompt_format": "format {}",
    "system_prompt": "system {}", "trigger": "trigger {}",  # issue 25
    "method": "{}", "dpo_beta": "beta {}", "grpo_group_size": "G{}", "grpo_temperature": "temp {}",
    "grpo_max_new_tokens": "gen {}", "grpo_kl_coef": "kl {}", "grpo_reward": "reward {}",
}
"""How each attacker field reads in a run name."""
NAMED = ("learning_rate", "optimizer", "finetune", "dataset_size")
"""What a run name shows of an attacker when no field varies in the sweep."""


def run_name(defence: str, attacker: dict[str, Any], varying: list[str]) -> str:
    """A trial's MLflow run name, read as the attack: the defence, then the attacker's fields
    that vary in this sweep in short form ('base · lr 3e-3 adamw n32 full'); LoRA fields are
    left out of a full fine-tuning attacker's name."""
    words = _words(attacker, varying or list(NAMED))
    return " · ".join([defence, " ".join(words)]) if words else defence


def _words(attacker: dict[str, Any], fields: list[str]) -> list[str]:
    """The attacker's `fields` in short form; LoRA fields left out of a full fine-tuning attacker."""
    return [SHORT.get(f, f + "={}").format(_word(attacker[f])) for f in fields
            if f in attacker and not (f.startswith("lora_") and attacker.get("finetune") == "full")]


def _word(v: Any) -> str:
    """A value in few characters: 0.003 -> 3e-3, 0.00327 -> 3.27e-3, 0.05 -> 0.05, lists joined by '+'."""
    if isinstance(v, list):
        return "+".join(_word(x) for x in v) if not (v and isinstance(v[0], dict)) else _fmt(v)
    if isinstance(v, float) and v != 0 and not 1e-2 <= abs(v) < 1e4:
        mantissa, exponent = f"{v:.2e}".split("e")  # 3 significant digits: '3.27e-03'
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return _fmt(v)


def field_order(field: str) -> tuple[int, str]:
    """Sort key of attacker fields: as SHORT lists them (the order a run name reads), then by name."""
    order = list(SHORT)
    return (order.index(field), field) if field in order else (len(order), field)


def from_param(value: str) -> Any:
    """An attacker field's value back from its MLflow param (a string): a number, a list, or the text."""
    import ast

    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value
    return parsed if isinstance(parsed, (int, float, list)) and not isinstance(parsed, bool) else value


def attacker_params(attacker: dict[str, Any]) -> dict[str, Any]:
    """The attacker fields a trial run logs as params: those that apply to it (no null ones, no
    lora_* with finetune full). The whole attacker stays in the run's tag `attacker`."""
    return {k: v for k, v in attacker.items()
            if v is not None and not (k.startswith("lora_") and attacker.get("finetune") == "full")}
