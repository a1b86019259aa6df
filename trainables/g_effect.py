"""The G-effect probe (Wang et al. 2025): how the attack's next plain gradient step moves each
risk, layer block by layer block, measured at an evaluation point."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from trainables import data as D
from trainables.methods.sft import supervised_loss
from trainables.names import G_EFFECT_RISKS, G_EFFECT_SECONDS, G_TOTAL, g_effect

if TYPE_CHECKING:
    from trainables.config import AttackConfig

BENIGN, HARMFUL = G_EFFECT_RISKS
_ADAPTER_PARTS = ("lora_", "modules_to_save", "original_module", "base_layer")
"""Where peft's parts of a parameter name begin (q_proj.lora_A.default.weight): the module path
ends before them."""


def _module_path(name: str) -> list[str]:
    """The module a parameter belongs to, as name parts: its own name (weight, bias) and any peft
    adapter parts cut off."""
    parts = name.split(".")
    end = next((i for i, part in enumerate(parts) if part.startswith(_ADAPTER_PARTS)), len(parts) - 1)
    return parts[:end]


def block_names(names: list[str]) -> list[str]:
    """Each parameter's block, from its name: layer<i> for the first numbered part of its module
    path (model.layers.3.mlp, transformer.h.3.attn, blocks.3; peft's base_model.model. prefix and
    lora_A/lora_B parts change nothing), i zero-padded to the widest index and at least 2 digits
    (layer00, layer01, ...: they sort); else its module's own name (embed_tokens, norm, lm_head)."""
    paths = [_module_path(name) for name in names]
    index = [next((int(part) for part in path if part.isdigit()), None) for path in paths]
    width = max([2, *(len(str(i)) for i in index if i is not None)])
    return [f"layer{i:0{width}d}" if i is not None else (path[-1] if path else name)
            for name, path, i in zip(names, paths, index, strict=True)]


class GEffectProbe:
    """The G-effect of `model`'s trainable parameters on fixed risk rows, measured on demand."""

    def __init__(self, model: torch.nn.Module, risks: dict[str, list[D.Tokenized]], pad_id: int, size: int):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.model, self.size, self.pad_id = model, size, pad_id
        self.params = [p for _, p in named]
        self.blocks = block_names([name for name, _ in named])
        self.risks = {risk: D.collate(items[:size], pad_id) for risk, items in risks.items()}

    @classmethod
    def for_trial(cls, cfg: AttackConfig, model: torch.nn.Module, tokenizer,
                  eval_rows: list[dict]) -> GEffectProbe | None:
        """The probe of a trial (None without cfg.g_effect): the first `size` held-out benign
        answers (cfg.benign_answers) and held-out harmful prompts f is scored on (`eval_rows`,
        with their compliant responses where data.eval names a response_field)."""
        if cfg.g_effect is None:
            return None
        size, benign, harmful = cfg.g_effect.size, cfg.benign_answers, cfg.data.eval
        assert benign is not None  # config.Evaluation refuses g_effect without benign answers
        risks = {BENIGN: D.tokenize_rows(tokenizer, D.load_rows(benign)[:size], benign, cfg.data)}
        if harmful.response_field:
            risks[HARMFUL] = D.tokenize_rows(tokenizer, eval_rows[:size], harmful, cfg.data)
        return cls(model, risks, tokenizer.pad_token_id, size)

    def measure(self, attack: list[D.Tokenized]) -> dict[str, float]:
        """The curves at the model's weights now, the update direction taken on the first `size`
        of `attack`: g_effect(risk, block) for every block, g_effect(risk, G_TOTAL), and
        G_EFFECT_SECONDS."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        curves: dict[str, float] = {}
        try:
            with torch.random.fork_rng(rng_devices, device_type=device.type), torch.enable_grad():
                step = self._gradient(D.collate(attack[: self.size], self.pad_id), device)
                for risk, batch in self.risks.items():
                    dots = torch.stack([torch.dot(g.flatten().double(), r.flatten().double())
                                        for g, r in zip(step, self._gradient(batch, device), strict=True)])
                    by_block: dict[str, float] = {}
                    for block, dot in zip(self.blocks, dots.tolist(), strict=True):
                        by_block[block] = by_block.get(block, 0.0) - dot  # from +0.0: a zero is never -0.0
                    curves.update({g_effect(risk, block): value for block, value in sorted(by_block.items())})
                    curves[g_effect(risk, G_TOTAL)] = sum(by_block.values())
        finally:
            for m, training in modes:
                m.training = training
        curves[G_EFFECT_SECONDS] = time.perf_counter() - start
        return curves

    def _gradient(self, batch: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """The loss gradient on `batch` for every trainable parameter (zeros where it has none)."""
        loss = supervised_loss(self.model, batch, device)
        return list(torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True))
