"""Vaccine (Huang et al. 2024, "Vaccine: Perturbation-aware Alignment for Large Language Models
against Harmful Fine-tuning Attack"): alignment SFT made robust to drift of the hidden states, the
official code being git-disl/Vaccine@8937f68, trainer.py `VaccineTrainer`.

    min_θ  max_{‖ε‖ ≤ ρ}  CE(θ; a_l + ε_l for every layer l)

a_l: the self-attention output of layer l (after o_proj, before the residual add); CE: the mean
next-token loss over the alignment answers (prompt + refusal, or + helpful answer). The inner max is
taken to first order, as in SAM: one pass gives g_l = ∂CE/∂a_l, ε_l = ρ·g_l / ‖(‖g_1‖, …, ‖g_L‖)‖₂
(one norm over all layers, batch and tokens, plus 1e-7 as the code adds), then a second pass with
each a_l shifted by the constant ε_l gives the gradient the optimizer applies (the first is dropped).

As the official code, except: the shift is added to the attention output rather than written into
its `.data` (the same forward value and the same parameter gradient: nothing behind the shift saves
it for backward); the gradient is read with a tensor hook on the attention output rather than the
deprecated module backward hook, and an attention output that needs no gradient (a layer below every
LoRA adapter) is made a leaf so its g_l is still read (the official hook never fires there); there is
no gradient accumulation (the code divides g_l by its steps, 1 in every script). Nothing is scaled
down for the toy scale: the method has no size-dependent part."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from trainables import data as D
from trainables.defences.base import Options as BaseOptions
from trainables.defences.base import Role, Step
from trainables.methods.base import Rates, Spent

if TYPE_CHECKING:
    import torch

    from trainables.config import Data

EPS = 1e-7
"""Added to the global norm before dividing, as the official `after_first_step` does: a zero
gradient gives a zero shift, not NaN."""
STREAM = "align"


class Options(BaseOptions):
    rho: float = Field(2.0, ge=0)
    """Radius of the hidden-state perturbation: the global L2 norm of all ε_l together (official
    default 2, the `--rho` of train.py; the paper's scripts sweep it). 0: plain SFT on the alignment
    data, at twice the cost."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-layout causal LM, through a PEFT wrapper when there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖(‖g_1‖, …, ‖g_L‖)‖₂: one L2 norm over every layer's gradient, batch and tokens alike."""
    import torch

    return torch.stack([g.norm(p=2) for g in grads]).norm(p=2)


def perturbations(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ε_l = ρ·g_l / (global_norm + 1e-7), detached: the loss-increasing shift of each layer."""
    scale = rho / (global_norm(grads) + EPS)
    return [(g * scale).detach() for g in grads]


@contextlib.contextmanager
def recorded_attention_grads(layers) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, each forward through layers[l].self_attn arranges for the backward to store
    ∂loss/∂(its output) in grads[l] (B x T x D)."""
    grads: list[torch.Tensor | None] = [None] * len(layers)

    def hook_for(index: int):
        def hook(module, args, output):
            out = output[0]
            if not out.requires_grad:  # nothing below it trains: read its gradient all the same
                out = out.detach().requires_grad_(True)

            def store(grad):
                grads[index] = grad.detach().clone()

            out.register_hook(store)
            return (out, *output[1:])

        return hook

    handles = [layer.self_attn.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield grads
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def shifted_attention(layers, shifts: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, layers[l].self_attn's output is a_l + shifts[l] (a constant)."""

    def hook_for(index: int):
        def hook(module, args, output):
            return (output[0] + shifts[index].to(output[0].dtype), *output[1:])

        return hook

    handles = [layer.self_attn.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def spent(batch: dict[str, torch.Tensor], rates: Rates, passes: int) -> Spent:
    """The batch's rows and supervised tokens (counted once: the same tokens are read by both
    passes) and `passes` forward+backward passes over its non-padding tokens. Left out: the norm,
    the scaling and the shift, O(L·B·T·D) element-wise work against the matmuls' O(params·B·T)."""
    supervised = int((batch["labels"][:, 1:] != D.IGNORE).sum())
    processed = int(batch["attention_mask"].sum())
    return Spent(batch["input_ids"].shape[0], supervised, float(passes * processed * rates.train))


class Vaccine:
    """Perturbation-aware alignment (the DefenceMethod protocol)."""

    name: ClassVar[str] = "vaccine"
    Options: ClassVar[type[Options]] = Options
    needs: ClassVar[tuple[Role, ...]] = ("refusal",)
    uses: ClassVar[tuple[Role, ...]] = ("refusal", "benign")
    official_finetune: ClassVar[str] = "lora"

    def __init__(self, options: Options, model: torch.nn.Module, rates: Rates, seed: int) -> None:
        self.options, self.rates = options, rates
        self.layers = decoder_layers(model)

    def streams(self, rows: dict[Role, list[dict[str, str]]], tokenizer: Any, data: Data) -> dict[str, list]:
        """One stream, "align": the refusal rows, then the benign rows when given, loss on the answer."""
        if not rows.get("refusal"):
            raise ValueError("vaccine needs refusal rows (harmful prompts answered with refusals): "
                             "give the build a refusal split")
        items = []
        for role in self.uses:
            for i, row in enumerate(rows.get(role) or []):
                for field in ("prompt", "response"):
                    if not isinstance(row.get(field), str):
                        raise ValueError(f"vaccine: {role} row {i} has no text field {field!r}; "
                                         f"map the split's fields to prompt/response")
                item = D.tokenize_pair(tokenizer, D.format_prompt(tokenizer, row["prompt"], data),
                                       row["response"], data.max_length)
                if all(label == D.IGNORE for label in item.labels):
                    raise ValueError(f"vaccine: {role} row {i}'s prompt fills data.max_length={data.max_length}, "
                                     f"leaving no answer token to train on; raise data.max_length or drop the row")
                items.append(item)
        return {STREAM: items}

    def collate(self, stream: str, items: list, pad_id: int) -> dict[str, torch.Tensor]:
        if stream != STREAM:
            raise ValueError(f"vaccine has one stream, {STREAM!r}, not {stream!r}")
        return D.collate(items, pad_id)

    def step(self, model: torch.nn.Module, draw, index: int) -> Step:
        batch = draw(STREAM, index)
        with recorded_attention_grads(self.layers) as grads:
            first = model(**batch).loss
            first.backward()
        if any(g is None for g in grads):
            raise RuntimeError("vaccine: a layer's attention output got no gradient; is the model's loss "
                               "built from its last hidden state?")
        norm = float(global_norm(grads))
        shifts = perturbations(grads, self.options.rho)
        model.zero_grad(set_to_none=True)  # the optimizer applies the perturbed pass's gradient alone
        with shifted_attention(self.layers, shifts):
            second = model(**batch).loss
            second.backward()
        terms = {"align_ce": first.item(), "perturbed_ce": second.item(), "loss": second.item(),
                 "perturbation_norm": norm}
        return Step(terms, spent(batch, self.rates, passes=2))
