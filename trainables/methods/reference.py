"""The released model as a frozen reference (DPO, GRPO's KL term): under LoRA the model being
trained with its adapters switched off (no extra memory), under full fine-tuning a frozen copy
taken before the first step (one more copy of the weights)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch


class Reference:
    """The release, read through `of(model)` inside torch.no_grad()."""

    def __init__(self, model: torch.nn.Module):
        self.copy: torch.nn.Module | None = None
        if not hasattr(model, "disable_adapter"):  # full fine-tuning: freeze the release as it is now
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def of(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The reference of `model` (the frozen copy, or `model` with its adapters off) for the block."""
        if self.copy is not None:
            yield self.copy
            return
        with model.disable_adapter():
            yield model
