"""Supervised fine-tuning on harmful prompt/response pairs: the mean next-token loss over the
response tokens (and the end token), every other label masked (data.tokenize_pair)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainables import data as D
from trainables.methods.base import Rates, Spent

if TYPE_CHECKING:
    import torch

    from trainables.config import Attacker


def supervised_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The mean next-token loss over the batch's supervised tokens (data.collate sets every other
    label to IGNORE)."""
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def spent(batch: dict[str, torch.Tensor], per_token_flops: int) -> Spent:
    """A batch's rows, its supervised tokens (labels past the first position, where the shifted
    loss reads them) and the training FLOPs of every token processed, padding excluded."""
    supervised = int((batch["labels"][:, 1:] != D.IGNORE).sum())
    processed = int(batch["attention_mask"].sum())
    return Spent(batch["input_ids"].shape[0], supervised, float(processed) * per_token_flops)


class SFT:
    """Supervised fine-tuning (the Method protocol)."""

    loss_is_error = True

    def __init__(self, hp: Attacker, model: torch.nn.Module, rates: Rates):
        self.rates = rates

    def items(self, rows: list[dict], tokenizer: Any, src, data) -> list[D.Tokenized]:
        return D.tokenize_rows(tokenizer, rows, src, data)

    def collate(self, items: list[D.Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
        return D.collate(items, pad_id)

    def loss(self, model, batch, device) -> tuple[torch.Tensor, Spent]:
        return supervised_loss(model, batch, device), spent(batch, self.rates.train)
