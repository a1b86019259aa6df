"""The attacker's optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from trainables.config import Attacker


def build_optimizer(params, attacker: Attacker) -> torch.optim.Optimizer:
    lr, wd = attacker.learning_rate, attacker.weight_decay
    if attacker.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if attacker.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if attacker.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if attacker.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {attacker.optimizer!r}")


def lr_factor(step: int, attacker: Attacker, max_steps: int) -> float:
    """Multiplier on the peak learning rate for the update that follows `step` updates:
    linear warmup, then constant, linear or cosine decay to 0 at max_steps."""
    warmup = attacker.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if attacker.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    progress = min(1.0, progress)
    if attacker.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, attacker: Attacker,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, attacker, max_steps)
    )
