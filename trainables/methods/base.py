"""What an attack method is: it draws its items from the attacker's rows, batches them, turns a
batch into a loss, and says what the step spent. The loop, the evaluation, the crossing and the
budget are the same for every method (trainables/attack.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from trainables.config import Data, DataSource


@dataclass(frozen=True)
class Spent:
    """What one optimizer step spent, in the budget's units."""

    examples: int
    """Training examples in the batch (SFT: prompt/response rows; DPO: preference pairs; GRPO: prompts)."""
    tokens: int
    """Tokens trained on: supervised response tokens (and their end token) the loss reads, plus
    `generated` (GRPO: the sampled completion tokens alone)."""
    flops: float
    """FLOPs of every forward and backward pass the step ran (a frozen reference's included)."""
    generated: int = 0
    """Tokens the step sampled from the model (0 for methods that train on fixed text)."""


@dataclass(frozen=True)
class Rates:
    """FLOPs per processed token of one trial's model (budget.flops_per_token)."""

    train: int
    """A forward and backward pass of the model being trained (LoRA: the adapters' share apart)."""
    forward: int
    """A forward pass alone of the released weights: 2 x the matmul parameters."""


class Method(Protocol):
    """One attack method; built per trial by methods.build with the stage's hyperparameters."""

    loss_is_error: bool
    """Its loss is an error that starts positive and falls as the attack learns (SFT's cross-entropy,
    DPO's -log sigma): a peak far above its first value means the training exploded. False for a
    policy-gradient surrogate (GRPO's), which centres on 0 and says nothing of divergence; the
    trainer then records no loss_peak_ratio."""

    def items(self, rows: list[dict], tokenizer: Any, src: DataSource, data: Data) -> list:
        """What batches are drawn from, one per drawn row, in the rows' order."""

    def collate(self, items: list, pad_id: int) -> dict[str, torch.Tensor]:
        """One batch of items (data.BatchStream addresses batches by index)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             device: torch.device) -> tuple[torch.Tensor, Spent]:
        """What the step minimises, and what computing it (and its backward) spent."""
