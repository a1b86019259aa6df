"""Direct preference optimisation (Rafailov et al. 2023) as an attack: on each attack row the
harmful response is preferred (chosen) over a refusal (rejected), against the released model as
the frozen reference. The loss is -log sigmoid(beta * ((log pi(c) - log pi(r)) - (log ref(c) -
log ref(r)))), each log-probability summed over a response's tokens and its end token (the tokens
SFT supervises)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from trainables import data as D
from trainables.methods.base import Rates, Spent
from trainables.methods.reference import Reference

if TYPE_CHECKING:
    from trainables.config import Attacker, Data, DataSource


@dataclass(frozen=True)
class Pair:
    """One preference pair: the same prompt with the chosen and the rejected response."""

    chosen: D.Tokenized
    rejected: D.Tokenized


def rejected_text(row: dict, src: DataSource, data: Data) -> str:
    """The refusal a row's harmful response is preferred over: its src.rejected_field, else data.refusal."""
    return str(row[src.rejected_field]) if src.rejected_field else data.refusal


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, the summed log-probability of its supervised tokens (labels not IGNORE),
    each token predicted from the position before it."""
    labels = labels[:, 1:]
    mask = labels != D.IGNORE
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean sigmoid DPO loss over pairs, from sequence log-probabilities."""
    margin = (chosen - rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


class DPO:
    """DPO with a refusal as the rejected answer (the Method protocol). The reference is the
    released model: under LoRA the same model with its adapters switched off, under full
    fine-tuning a frozen copy taken here, before any step (one more copy of the weights)."""

    loss_is_error = True

    def __init__(self, hp: Attacker, model: torch.nn.Module, rates: Rates):
        self.beta, self.rates = hp.dpo_beta, rates
        self.reference = Reference(model)

    def items(self, rows: list[dict], tokenizer: Any, src: DataSource, data: Data) -> list[Pair]:
        out = []
        for row in rows:
            prompt = D.format_prompt(tokenizer, row[src.prompt_field], data)
            out.append(Pair(D.tokenize_pair(tokenizer, prompt, row[src.response_field], data.max_length),
                            D.tokenize_pair(tokenizer, prompt, rejected_text(row, src, data), data.max_length)))
        return out

    def collate(self, items: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
        """Chosen sequences in the first half of the batch, their rejected ones in the second:
        one forward pass reads both."""
        return D.collate([p.chosen for p in items] + [p.rejected for p in items], pad_id)

    def loss(self, model, batch, device) -> tuple[torch.Tensor, Spent]:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        n = ids.shape[0] // 2
        policy = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        with torch.no_grad(), self.reference.of(model) as ref:
            reference = sequence_logps(ref(input_ids=ids, attention_mask=mask).logits, labels)
        loss = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
        supervised = int((batch["labels"][:, 1:] != D.IGNORE).sum())  # chosen + rejected responses
        processed = int(batch["attention_mask"].sum())
        # the policy's forward and backward over both sequences, and the reference's forward
        return loss, Spent(n, supervised, float(processed) * (self.rates.train + self.rates.forward))

