"""TAR, first order (Tamirisa et al. 2025, "Tamper-Resistant Safeguards for Open-Weight LLMs"), as
rishub-tamirisa/tamper-resistance@19de233 computes it (modules/training.py: tar_training_loop,
inner_loop_step, schedule; modules/objectives.py: max_entropy_loss, obj_model_mse_representations;
defaults from run_tar_bio.sh). One outer step `index`:

    lr ~ uniform(inner_lrs); a fresh AdamW(lr) over the trained weights θ_0 = θ;
    for k < K: θ_{k+1} = θ_k after one AdamW step on CE(attack batch index·K + k);
        if (k + 1) % tr_every == 0: store += w_k ∇TR(θ_{k+1}),
            w_k = tr_coefficient · exp(schedule_lambda · (k − (K−1)))
    restore θ;  grad = retain_coefficient · ∇[CE_benign(θ) + (1/(L+1)) Σ_i mean_{b,t} ‖h_i(θ) − h_i(ref)‖₂] + store

TR(θ) = − the mean entropy of the next-token distribution over every position of the held-out
tamper batch, padding included (minimising it keeps the attacked model uncertain on harmful text);
h_i: the L+1 hidden states (embedding output first), every position, padding included; ref: the
starting weights, frozen. First order: the adapted weights' gradients are added to θ's, nothing
backpropagates through the inner steps.

Simplified at this scale: the paper's "random-mapped" starting stage is out of scope (the build
starts from its checkpoint, which is also the reference; the official reference is the model
before random mapping); one adversary (SFT on the harmful rows, constant lr) where the official
samples among two harmful corpora and a benign-then-harmful switch; one batch size for every
stream; padding to the batch's longest row where the official pads every row to 256 tokens; CE
on the response tokens (the official's corpora are plain text, every token supervised). As the
official (--unbounded, one task per outer step): no lower bound on TR, the tamper batch is the next
held-out batch each outer step (draw("tamper", index)).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field, model_validator

from trainables import data as D
from trainables.defences import base
from trainables.methods.base import Rates, Spent
from trainables.methods.reference import Reference

if TYPE_CHECKING:
    from trainables.config import Data


class Options(base.Options):
    """TAR's options; defaults are run_tar_bio.sh's."""

    inner_steps: int = Field(64, ge=1)
    """K, the attack steps of one outer step (official --tar_inner_loop_steps 64)."""
    tr_every: int = Field(4, ge=1)
    """The tamper-resistance loss is taken after inner step k when (k + 1) % tr_every == 0
    (official --tar_inner_loop_subsample 4: after steps 3, 7, ..., 63)."""
    inner_lrs: list[Annotated[float, Field(gt=0)]] = Field([2e-6, 2e-5, 4e-5], min_length=1)
    """The attacker's learning rates, one drawn uniformly per outer step (official
    --adversary_lr_samples 2e-6,2e-5,4e-5)."""
    tamper_rows: int = Field(4, ge=1)
    """The last tamper_rows harmful rows are held out as the tamper batch's rows, never attacked on
    (the official holds out 20% of its harmful corpus); the rest are the attack's."""
    tr_coefficient: float = Field(4.0, ge=0)
    """The tamper-resistance weight at the last inner step (official --tar_tamper_resistance_grad_scale 4.0)."""
    schedule_lambda: float = Field(0.0625, ge=0)
    """The weights' growth rate over the inner steps (official --schedule_lambda 0.0625): late
    steps, where the attack has gone furthest, weigh most."""
    retain_coefficient: float = Field(1.0, ge=0)
    """The retain loss's weight (official --tar_retain_scale 1.0)."""

    @model_validator(mode="after")
    def _takes_tamper_loss(self) -> Options:
        if self.tr_every > self.inner_steps:
            raise ValueError(f"tr_every={self.tr_every} > inner_steps={self.inner_steps}: the tamper-resistance loss "
                             "would never be taken; set tr_every <= inner_steps")
        return self


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (bf16/fp16 upcast, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of each supervised label given the positions before it (the official
    log_p_loss; data.collate marks every other label IGNORE)."""
    return torch.nn.functional.cross_entropy(_wide(logits[:, :-1]).flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=D.IGNORE)


def tamper_resistance_loss(logits: torch.Tensor) -> torch.Tensor:
    """Minus the mean entropy of softmax(logits) over every position of the batch (padding included,
    as the official max_entropy_loss reads every position)."""
    logp = torch.log_softmax(_wide(logits), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return -entropy.mean()


def tr_weight(k: int, inner_steps: int, coefficient: float, schedule_lambda: float) -> float:
    """The weight of the tamper-resistance loss taken after inner step k (0-based): the official
    schedule(k, K, lambda) times its grad scale, with no normalisation by the number taken."""
    return coefficient * math.exp(schedule_lambda * (k - (inner_steps - 1)))


def tr_steps(inner_steps: int, every: int) -> list[int]:
    """The inner steps after which the tamper-resistance loss is taken."""
    return [k for k in range(inner_steps) if (k + 1) % every == 0]


def representation_distance(hidden: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean over hidden states of the mean over batch and positions (padding included) of the
    L2 distance (not squared) between each state and the reference's."""
    return torch.stack([torch.linalg.vector_norm(_wide(r) - _wide(h), dim=-1).mean()
                        for h, r in zip(hidden, reference, strict=True)]).mean()


def inner_lr(lrs: list[float], seed: int, index: int) -> float:
    """The attacker's learning rate at outer step `index`: a function of (seed, index) alone, so a
    resumed build draws what an uninterrupted one would."""
    return lrs[random.Random(f"tar/{seed}/{index}").randrange(len(lrs))]


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _processed(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def _supervised(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != D.IGNORE).sum())


class TAR:
    """Tamper-attack resistance, first order (base.DefenceMethod)."""

    name: ClassVar[str] = "tar"
    Options: ClassVar[type[Options]] = Options
    needs: ClassVar[tuple[base.Role, ...]] = ("harmful", "benign")
    uses: ClassVar[tuple[base.Role, ...]] = ("harmful", "benign")
    official_finetune: ClassVar[str] = "full"

    def __init__(self, options: Options, model: torch.nn.Module, rates: Rates, seed: int) -> None:
        self.options, self.rates, self.seed = options, rates, seed
        self.reference = Reference(model)  # the starting weights: adapters off, or a frozen copy

    def streams(self, rows: dict[base.Role, list[dict[str, str]]], tokenizer: Any, data: Data) -> dict[str, list]:
        harmful, benign, held = rows.get("harmful") or [], rows.get("benign") or [], self.options.tamper_rows
        if len(harmful) <= held:
            raise ValueError(f"tar needs more harmful rows than tamper_rows={held} (the held-out tamper batch's rows), "
                             f"got {len(harmful)}; add harmful rows or lower build.options.tamper_rows")
        if not benign:
            raise ValueError("tar needs benign rows (its retain loss); give the build benign data")

        def items(role: str, part: list[dict[str, str]]) -> list[D.Tokenized]:
            for i, row in enumerate(part):
                if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in ("prompt", "response")):
                    raise ValueError(f"tar: {role} row {i + 1} needs text fields 'prompt' and 'response'; fix that row")
            return [D.tokenize_pair(tokenizer, D.format_prompt(tokenizer, r["prompt"], data), r["response"],
                                    data.max_length) for r in part]

        return {"attack": items("harmful", harmful[:-held]), "tamper": items("harmful", harmful[-held:]),
                "retain": items("benign", benign)}

    def collate(self, stream: str, items: list, pad_id: int) -> dict[str, torch.Tensor]:
        if stream not in ("attack", "tamper", "retain"):
            raise ValueError(f"tar has no stream {stream!r}; its streams are attack, tamper, retain")
        return D.collate(items, pad_id)

    def step(self, model: torch.nn.Module, draw: base.Draw, index: int) -> base.Step:
        o, K = self.options, self.options.inner_steps
        params = [p for p in model.parameters() if p.requires_grad]
        lr = inner_lr(o.inner_lrs, self.seed, index)
        saved = [p.detach().clone() for p in params]
        store = [torch.zeros_like(p) for p in params]
        # torch's AdamW defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01), as the official's
        # torch.optim.AdamW(model.parameters(), lr); made fresh each outer step, dropped after it
        attacker = torch.optim.AdamW(params, lr=lr)
        tamper = draw("tamper", index)
        weighted, weights, trained, tokens, examples = 0.0, 0.0, 0, 0, 0
        for k in range(K):
            batch = draw("attack", index * K + k)
            for p in params:
                p.grad = None
            ce = next_token_ce(model(**_inputs(batch), use_cache=False).logits, batch["labels"])
            ce.backward()
            attacker.step()
            trained, tokens = trained + _processed(batch), tokens + _supervised(batch)
            examples += batch["input_ids"].shape[0]
            if (k + 1) % o.tr_every:
                continue
            w = tr_weight(k, K, o.tr_coefficient, o.schedule_lambda)
            for p in params:
                p.grad = None
            tr = tamper_resistance_loss(model(**_inputs(tamper), use_cache=False).logits)
            (w * tr).backward()
            with torch.no_grad():
                for s, p in zip(store, params, strict=True):
                    if p.grad is not None:
                        s.add_(p.grad)
            weighted, weights = weighted + w * tr.item(), weights + w
            # the entropy reads positions, not labels: the tamper rows' tokens count as trained on
            trained, tokens = trained + _processed(tamper), tokens + _processed(tamper)
        del attacker
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None

        retain = draw("retain", index)
        with torch.no_grad(), self.reference.of(model) as ref:
            ref_hidden = ref(**_inputs(retain), output_hidden_states=True, use_cache=False).hidden_states
        out = model(**_inputs(retain), output_hidden_states=True, use_cache=False)
        retain_loss = next_token_ce(out.logits, retain["labels"])
        distance = representation_distance(out.hidden_states, ref_hidden)  # 0 with 0 gradient where equal
        (o.retain_coefficient * (retain_loss + distance)).backward()
        with torch.no_grad():
            for p, s in zip(params, store, strict=True):
                if p.grad is None:
                    p.grad = s
                else:
                    p.grad.add_(s)

        retain_ce, retain_distance = retain_loss.item(), distance.item()
        terms = {"retain_ce": retain_ce, "retain_distance": retain_distance,
                 "tamper_resistance": weighted / weights if weights else 0.0,  # the w-weighted mean of TR
                 "inner_lr": lr, "inner_final_ce": ce.item(),
                 "loss": o.retain_coefficient * (retain_ce + retain_distance) + weighted}
        # FLOPs: every attack and tamper pass and the retain pass with its backward, the reference's
        # forward; left out: padding positions, the K AdamW updates and the weights' snapshot/restore
        n_retain = _processed(retain)
        flops = float(trained + n_retain) * self.rates.train + float(n_retain) * self.rates.forward
        examples += tamper["input_ids"].shape[0] + retain["input_ids"].shape[0]  # the tamper batch: drawn once
        return base.Step(terms, Spent(examples, tokens + _supervised(retain), flops))
