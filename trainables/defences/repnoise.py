"""RepNoise (Rosati et al. 2024, "Representation noising: a defence mechanism against harmful
finetuning"): on pairs of one harmful question answered harmfully and with a refusal, learn the
refusal, push each layer's MLP output on the harmful answer toward Gaussian noise, and raise the
harmful answer's loss read through the output head at every hidden state:

    loss = CE_m(refusal) + beta * noise - alpha * ascent
    noise  = (1/L) sum_l MMD(m*a_l(harmful), m*eps_l)     a_l: layer l's MLP output, B x (T*D)
    ascent = log((CE_m(logits) + sum_i CE_m(head(norm(h_i)))) / (L+1) + 1)   h_i: the L+1 hidden states

m marks the positions where the two padded token sequences differ. As the official code computes
it (domenicrosati/representation-noising@03689ff, representation_noising/loss.py: rep_noise_loss,
masked_token_ce_loss, MMD_loss), and followed here where it departs from the paper:
- CE_m's labels are the input ids at positions with m = 1 (prompt tokens count there), except id 0
  (the code masks labels by multiplying, then ignores every 0); the logits predicting them are
  multiplied by m at their own position, so a token after a shared one (the first differing token
  of an answer) is predicted from all-zero logits: it adds log V with no gradient.
- Where only one sequence is padding, m = 1: that padding is read as labels and by the noise term.
- The '+1' sits outside the mean, which divides L+2 losses by L+1, and the last hidden state is the
  one the model already normed (HF's hidden_states), so the lens normalises it twice.
Computed differently here, to the same value (the noise: the same distribution): batches are padded
to their longest sequence, not to 256 (the extra positions are shared padding, m = 0); the lens
applies the head at the counted positions alone; the MMD runs row by row in float32 at least; the
noise comes from a generator seeded by (seed, step), so a step replays exactly; pairs are joined by
prompt from the harmful and refusal rows (the official data holds both answers in one row); a batch
with no counted label gives a CE of 0, not NaN (pairs whose two sequences are identical are dropped,
so none arises from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from trainables import data as D
from trainables.defences.base import Draw, Role, Step
from trainables.defences.base import Options as BaseOptions
from trainables.methods.base import Rates, Spent

if TYPE_CHECKING:
    from trainables.config import Data

KERNEL_MUL, KERNEL_NUM = 2.0, 5
"""MMD_loss's Gaussian kernels: 5 bandwidths, each twice the last, centred on the mean pairwise
squared distance."""


class Options(BaseOptions):
    """RepNoise's options (rep_noise_loss's arguments)."""

    alpha: float = Field(1.0, ge=0)
    """Weight of the ascent term (the log of the harmful loss over every layer), subtracted; official 1."""
    beta: float = Field(0.001, ge=0)
    """Weight of the noise term (the layers' mean MMD to Gaussian noise); official 0.001."""


@dataclass(frozen=True)
class Pair:
    """One question's harmful and refusal sequences (prompt + answer + end token, token ids)."""

    harmful: list[int]
    refusal: list[int]


def pair_rows(harmful: list[dict[str, str]], refusal: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(prompt, harmful answer, refusal) for each harmful row whose prompt (exact text) has a refusal
    row; a prompt's refusals are taken in turn when it has more harmful rows than refusals."""
    refusals: dict[str, list[str]] = {}
    for row in refusal:
        refusals.setdefault(row["prompt"], []).append(row["response"])
    used: dict[str, int] = {}
    out = []
    for row in harmful:
        options = refusals.get(row["prompt"])
        if options:
            k = used.get(row["prompt"], 0)
            used[row["prompt"]] = k + 1
            out.append((row["prompt"], row["response"], options[k % len(options)]))
    return out


def counted(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which shifted labels CE_m reads (B x T-1, bool), those labels, and the factor (m at the
    predicting position, 0 or 1) its logits are multiplied by, as masked_token_ce_loss does."""
    where = mask[:, 1:] & (ids[:, 1:] != 0)
    return where, ids[:, 1:][where], mask[:, :-1][where].to(torch.float32)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over the counted positions' logits (K x V), each first scaled by its
    factor. No counted position gives 0 (the official code would give NaN)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float() * scale[:, None], labels)


def mmd(source: torch.Tensor, target: torch.Tensor, kernel_mul: float = KERNEL_MUL,
        kernel_num: int = KERNEL_NUM) -> torch.Tensor:
    """MMD_loss: the mean of K_XX + K_YY - K_XY - K_YX over B x B, K a sum of Gaussian kernels whose
    base bandwidth is the mean pairwise squared distance over both sets (not differentiated)
    divided by kernel_mul ** (kernel_num // 2)."""
    total = torch.cat([source, target]).to(torch.promote_types(source.dtype, torch.float32))
    n, b = total.shape[0], source.shape[0]
    # row by row: the official (n x n x N) difference tensor is too large at T*D features
    d2 = torch.stack([((total - total[i]) ** 2).sum(1) for i in range(n)])
    bandwidth = d2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-d2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def noise_term(activations: list[torch.Tensor], mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The layers' mean MMD between the masked activations (B x T x D each, flattened to B x T*D)
    and masked standard Gaussian noise of that shape, drawn in layer order from `generator`."""
    total = 0.0
    for a in activations:
        m = mask[:, :, None].to(a.dtype)
        eps = torch.randn(a.shape, generator=generator, device=a.device, dtype=torch.float32)
        total = total + mmd((a * m).flatten(1), (eps * m.float()).flatten(1))
    return total / len(activations)


def ascent_term(final_ce: torch.Tensor, lens_ces: list[torch.Tensor]) -> torch.Tensor:
    """log((final CE + the lens CEs) / number of lens CEs + 1), the '+1' outside the mean as coded."""
    return torch.log((final_ce + sum(lens_ces)) / len(lens_ces) + 1)


def _llama(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if not all(hasattr(inner, a) for a in ("layers", "norm")) or base.get_output_embeddings() is None:
        raise ValueError(f"repnoise needs a causal LM with the Llama layout (model.model.layers[i].mlp, "
                         f"model.model.norm, lm_head); got {type(base).__name__}")
    return base


class RepNoise:
    """RepNoise (the DefenceMethod protocol): one "pairs" stream, two passes per step."""

    name: ClassVar[str] = "repnoise"
    Options: ClassVar[type[Options]] = Options
    needs: ClassVar[tuple[Role, ...]] = ("harmful", "refusal")
    uses: ClassVar[tuple[Role, ...]] = ("harmful", "refusal")
    official_finetune: ClassVar[str] = "full"

    def __init__(self, options: Options, model: torch.nn.Module, rates: Rates, seed: int) -> None:
        self.options, self.rates, self.seed = options, rates, seed
        _llama(model)

    def streams(self, rows: dict[Role, list[dict[str, str]]], tokenizer: Any, data: Data) -> dict[str, list]:
        for role in self.needs:
            if not rows.get(role):
                raise ValueError(f"repnoise needs rows for the {role!r} role; give the build's data a {role} split")
            for row in rows[role]:
                if missing := [f for f in ("prompt", "response") if f not in row]:
                    raise ValueError(f"repnoise: a {role!r} row has no {missing[0]!r} field; give every row "
                                     "a prompt and a response")
        items = []
        for prompt, harmful, refusal in pair_rows(rows["harmful"], rows["refusal"]):
            text = D.format_prompt(tokenizer, prompt, data)
            pair = Pair(D.tokenize_pair(tokenizer, text, harmful, data.max_length).input_ids,
                        D.tokenize_pair(tokenizer, text, refusal, data.max_length).input_ids)
            if pair.harmful != pair.refusal:  # identical sequences (or cut the same) teach nothing
                items.append(pair)
        if not items:
            raise ValueError("repnoise pairs each 'harmful' row with a 'refusal' row of the same prompt, and none "
                             "pair (or every pair is identical within data.max_length); the prompts must match "
                             "exactly")
        return {"pairs": items}

    def collate(self, stream: str, items: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
        # one width for both sides, so m compares the same positions (right padding, as the official)
        width = max(max(len(p.harmful), len(p.refusal)) for p in items)
        batch = {}
        for side in ("harmful", "refusal"):
            ids = torch.full((len(items), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(items), width), dtype=torch.long)
            for i, p in enumerate(items):
                seq = getattr(p, side)
                ids[i, : len(seq)] = torch.tensor(seq)
                attention[i, : len(seq)] = 1
            batch[f"{side}_ids"], batch[f"{side}_attention_mask"] = ids, attention
        return batch

    def step(self, model: torch.nn.Module, draw: Draw, index: int) -> Step:
        batch = draw("pairs", index)
        base = _llama(model)
        layers, norm, head = base.model.layers, base.model.norm, base.get_output_embeddings()
        harmful, refusal = batch["harmful_ids"], batch["refusal_ids"]
        mask = harmful != refusal
        where, labels, scale = counted(harmful, mask)

        activations: list[torch.Tensor | None] = [None] * len(layers)

        def keep(i: int):
            def hook(_module, _inputs, output):
                activations[i] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
        try:
            out = model(input_ids=harmful, attention_mask=batch["harmful_attention_mask"], output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        generator = torch.Generator(device=harmful.device).manual_seed(self.seed * 1_000_003 + index)
        noise = noise_term(activations, mask, generator)
        harmful_ce = masked_ce(out.logits[:, :-1][where], labels, scale)
        lens = [masked_ce(head(norm(h[:, :-1][where])), labels, scale) for h in out.hidden_states]
        ascent = ascent_term(harmful_ce, lens)
        # two backward passes, one per forward: the same sum, with one graph alive at a time
        (self.options.beta * noise - self.options.alpha * ascent).backward()
        del out
        activations.clear()

        r_where, r_labels, r_scale = counted(refusal, mask)
        r_out = model(input_ids=refusal, attention_mask=batch["refusal_attention_mask"])
        refusal_ce = masked_ce(r_out.logits[:, :-1][r_where], r_labels, r_scale)
        refusal_ce.backward()

        loss = refusal_ce.item() + self.options.beta * noise.item() - self.options.alpha * ascent.item()
        terms = {"refusal_ce": refusal_ce.item(), "noise": noise.item(), "ascent": ascent.item(),
                 "harmful_ce": harmful_ce.item(), "loss": loss}
        return Step(terms, self._spent(batch, len(lens), int(labels.numel()), int(r_labels.numel()), head))

    def _spent(self, batch: dict[str, torch.Tensor], n_lens: int, n_harmful: int, n_refusal: int,
               head: torch.nn.Module) -> Spent:
        """Both sequences' forward and backward over their non-padding tokens, plus the lens: the head
        applied again to each of the L+1 hidden states at the counted positions, charged at its share
        of a trained token (exact under full fine-tuning; under LoRA it carries the adapters' share
        too, a slight overcount). Left out: the lens's norms, the noise draws and the MMDs (O(B^2 T D)
        per layer, far below one pass)."""
        processed = int(batch["harmful_attention_mask"].sum() + batch["refusal_attention_mask"].sum())
        matmul = self.rates.forward / 2
        head_rate = self.rates.train * head.weight.numel() / matmul if matmul else 0.0
        flops = float(processed) * self.rates.train + n_lens * n_harmful * head_rate
        # examples: the rows drawn, a harmful and a refusal row per pair
        return Spent(2 * batch["harmful_ids"].shape[0], n_harmful + n_refusal, flops)
