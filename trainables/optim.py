"""The attacker's optimizer and learning-rate schedule.

Every schedule spans a horizon: the steps of the run, or of the stage, it belongs to."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from trainables.config import Attacker

if TYPE_CHECKING:
    import torch

_SCHEDULEFREE_MISSING = "optimizer schedule_free_adamw needs the schedulefree package: pip install schedulefree"


def missing_dependency(optimizer: str) -> str | None:
    """Why `optimizer` cannot be built here (a package is missing), or None: for a preflight
    check before any trial starts."""
    if optimizer != "schedule_free_adamw":
        return None
    try:
        import schedulefree  # noqa: F401
    except ImportError:
        return _SCHEDULEFREE_MISSING
    return None


def build_optimizer(params, attacker: Attacker) -> torch.optim.Optimizer:
    import torch  # here: the spec's checks ask missing_dependency, and need no torch

    lr, wd, name = attacker.learning_rate, attacker.weight_decay, attacker.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
    if name == "schedule_free_adamw":
        if message := missing_dependency(name):
            raise ValueError(message)
        import schedulefree

        # Warmup comes from our scheduler (same semantics as every other optimizer), so the
        # optimizer's own warmup stays off.
        optimizer = schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=wd, warmup_steps=0)
        optimizer.train()  # it refuses to step until put in train mode
        return optimizer
    raise ValueError(f"unknown optimizer {name!r}")


@contextmanager
def evaluating(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Weights as they should be scored: schedule-free optimizers train at one point (y) and
    evaluate at their average (x), switched by eval()/train(); others have no such methods."""
    if hasattr(optimizer, "eval"):
        optimizer.eval()
    try:
        yield
    finally:
        if hasattr(optimizer, "train"):
            optimizer.train()


def warmup_length(attacker: Attacker, horizon: int) -> int:
    return max(attacker.warmup_steps, round(attacker.warmup_ratio * horizon))


def lr_factor(step: int, attacker: Attacker, horizon: int) -> float:
    """Multiplier on the peak learning rate for the update that follows `step` updates:
    linear warmup, then constant, linear or cosine decay to 0 at `horizon`, or SGDR (cosine
    to 0 over each period, restarting at 1; Loshchilov & Hutter 2017, T_mult 1)."""
    warmup = warmup_length(attacker, horizon)
    if step < warmup:
        return (step + 1) / warmup
    if attacker.lr_schedule == "constant":
        return 1.0
    if attacker.lr_schedule == "sgdr":
        period = attacker.sgdr_period or max(1, round(horizon / 4))
        return 0.5 * (1.0 + math.cos(math.pi * ((step - warmup) % period) / period))
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    if attacker.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, attacker: Attacker,
                    horizon: int) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, attacker, horizon)
    )
