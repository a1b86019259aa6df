"""Booster (Huang et al. 2025, "Booster: Tackling harmful fine-tuning for large language models via
attenuating harmful perturbation"): alignment that also flattens the harmful loss's one-step descent.

Objective: min_theta f(theta) + lamb * [h(theta) - h(theta - alpha * grad h(theta) / ||grad h(theta)||)],
f = CE on the alignment (refusal) answers, h = CE on harmful answers, ||.|| one L2 norm over every trained
parameter. First order, as the official code: three passes per step, g = grad h(theta) on the harmful batch,
g' = grad h(theta') on the same batch at theta' = theta - alpha * g / (||g|| + 1e-7), theta restored, then
grad f(theta) on the refusal batch, and the update is grad f + lamb * g - lamb * g' (the g' term is not
differentiated through theta').

Official code: git-disl/Booster@6421918, trainer.py BoosterAlignmentTrainer.training_step (perturb_aware
"False", its default and the script's). Simplified here: theta is restored from a saved copy (bit-exact)
where the official code adds alpha * g / ||g|| back (equal up to rounding); the alignment set is the
refusal rows, then the benign rows when the build gives them (the official set is refusals alone,
BeaverTails prompts with refusal answers; give no benign rows to match it); one harmful batch per step
is batch `index` of its own stream, as the official code draws a fresh harmful batch every step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from trainables import data as D
from trainables.defences import base
from trainables.methods.base import Rates, Spent

if TYPE_CHECKING:
    import torch

    from trainables.config import Data

EPS = 1e-7
"""Added to the harmful gradient's norm before dividing by it, as the official code does."""


class Options(base.Options):
    """Booster's options (official defaults from script/alignment/smooth_align.sh)."""

    lamb: float = Field(5.0, ge=0)
    """lambda, the weight of the harmful-perturbation term; 0 is plain SFT on the alignment set.
    Official default 5 (smooth_align.sh, the paper's main setting); an open issue notes the paper's
    tables disagree (lambda 5 in one, 25 in another)."""
    alpha: float = Field(0.1, ge=0)
    """The length of the simulated harmful step theta' = theta - alpha * g / ||g|| (one L2 norm over every
    trained parameter). Official default 0.1; 0 makes the two harmful gradients equal and the lambda term 0."""


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all the tensors together (the official _grad_norm: the norm of the per-tensor
    norms), computed in at least float32."""
    import torch

    return torch.stack([_wide(t).norm(p=2) for t in tensors]).norm(p=2)


def harmful_step(grads: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """What theta' adds to each parameter: -alpha * g / (||g|| + EPS), ||g|| global over all of them."""
    scale = alpha / (global_norm(grads) + EPS)
    return [-(scale * _wide(g)).to(g.dtype) for g in grads]


def update(grad_f: torch.Tensor, g: torch.Tensor, g_after: torch.Tensor, lamb: float) -> torch.Tensor:
    """One parameter's update gradient: grad f + lamb * g - lamb * g' (official order of terms)."""
    return grad_f + lamb * g - lamb * g_after


def objective(f: float, h: float, h_after: float, lamb: float) -> float:
    """The value the update descends: f + lamb * (h - h')."""
    return f + lamb * (h - h_after)


def _wide(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters' .grad (zeros for one the loss did not reach), detached copies; .grad cleared."""
    import torch

    out = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return out


class Booster:
    """Booster (base.DefenceMethod)."""

    name: ClassVar[str] = "booster"
    Options: ClassVar[type[base.Options]] = Options
    needs: ClassVar[tuple[base.Role, ...]] = ("refusal", "harmful")
    uses: ClassVar[tuple[base.Role, ...]] = ("refusal", "harmful", "benign")
    official_finetune: ClassVar[str] = "lora"

    def __init__(self, options: Options, model: torch.nn.Module, rates: Rates, seed: int) -> None:
        self.options, self.rates = options, rates

    def streams(self, rows: dict[base.Role, list[dict[str, str]]], tokenizer: Any, data: Data) -> dict[str, list]:
        for role in self.needs:
            if not rows.get(role):
                raise ValueError(f"booster needs {role} rows (prompt/response pairs) and got none; "
                                 f"give the build's data a {role} split")
        alignment = _tokenized(rows["refusal"], "refusal", tokenizer, data)
        alignment += _tokenized(rows.get("benign") or [], "benign", tokenizer, data)
        return {"refusal": alignment, "harmful": _tokenized(rows["harmful"], "harmful", tokenizer, data)}

    def collate(self, stream: str, items: list, pad_id: int) -> dict[str, torch.Tensor]:
        if stream not in ("refusal", "harmful"):
            raise ValueError(f"booster has no stream {stream!r}; its streams are 'refusal' and 'harmful'")
        return D.collate(items, pad_id)

    def step(self, model: torch.nn.Module, draw: base.Draw, index: int) -> base.Step:
        import torch

        lamb, alpha = self.options.lamb, self.options.alpha
        params = [p for p in model.parameters() if p.requires_grad]
        harmful = draw("harmful", index)
        h = model(**harmful).loss  # pass 1: g = grad h(theta)
        h.backward()
        g = _grads(params)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, harmful_step(g, alpha), strict=True):
                    p.add_(d)
            h_after = model(**harmful).loss  # pass 2: g' = grad h(theta') on the same batch
            h_after.backward()
            g_after = _grads(params)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        del saved
        refusal = draw("refusal", index)
        f = model(**refusal).loss  # pass 3: grad f(theta), at the restored weights
        f.backward()
        with torch.no_grad():
            for p, a, b in zip(params, g, g_after, strict=True):
                p.grad = update(torch.zeros_like(p) if p.grad is None else p.grad, a, b, lamb)
        terms = {"refusal_ce": float(f.detach()), "harmful_ce": float(h.detach()),
                 "harmful_ce_after": float(h_after.detach())}
        terms["loss"] = objective(terms["refusal_ce"], terms["harmful_ce"], terms["harmful_ce_after"], lamb)
        return base.Step(terms, self.spent(refusal, harmful))

    def spent(self, refusal: dict[str, torch.Tensor], harmful: dict[str, torch.Tensor]) -> Spent:
        """Rows of the two batches drawn; the supervised tokens of the three losses (the harmful batch's
        twice: h and h' both read it); three forward+backward passes over their non-padding tokens.
        Left out: the norm, the perturbation and the restore, elementwise over the trained parameters
        (one parameter's worth of work, against a parameter's worth per token for each pass)."""
        rows = refusal["input_ids"].shape[0] + harmful["input_ids"].shape[0]
        supervised = _supervised(refusal) + 2 * _supervised(harmful)
        processed = int(refusal["attention_mask"].sum()) + 2 * int(harmful["attention_mask"].sum())
        return Spent(rows, supervised, float(processed) * self.rates.train)


def _supervised(batch: dict[str, torch.Tensor]) -> int:
    """Labels past the first position, where the shifted loss reads them (as methods.sft.spent)."""
    return int((batch["labels"][:, 1:] != D.IGNORE).sum())


def _tokenized(rows: list[dict[str, str]], role: str, tokenizer: Any, data: Data) -> list[D.Tokenized]:
    out = []
    for i, row in enumerate(rows):
        for field in ("prompt", "response"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"booster: {role} row {i + 1} has no text field {field!r}; give every row "
                                 "a prompt and a response")
        prompt = D.format_prompt(tokenizer, row["prompt"], data)
        out.append(D.tokenize_pair(tokenizer, prompt, row["response"], data.max_length))
    return out
