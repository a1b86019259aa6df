"""Loading a (defended) checkpoint and making it trainable: LoRA adapters or all weights.

LoRA versus full fine-tuning is decided here and nowhere else."""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainables.config import Attacker, Checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(ckpt: Checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(
        ckpt.tokenizer or ckpt.model,
        revision=None if ckpt.tokenizer else ckpt.revision,
        trust_remote_code=ckpt.trust_remote_code,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ckpt: Checkpoint, device: torch.device) -> torch.nn.Module:
    """The released model: base weights, with the defender's PEFT adapter merged in if any,
    so the attacker starts from exactly what was published."""
    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per trial is noise in a sweep
    model = AutoModelForCausalLM.from_pretrained(
        ckpt.model,
        revision=ckpt.revision,
        trust_remote_code=ckpt.trust_remote_code,
        dtype=_DTYPES[ckpt.dtype],
    )
    if ckpt.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ckpt.adapter).merge_and_unload()
    return model.to(device)


def make_trainable(model: torch.nn.Module, attacker: Attacker) -> tuple[torch.nn.Module, int | None]:
    """Wrap for the attack. Returns the model to train and, for LoRA, its number of
    trainable adapter parameters (None for full fine-tuning)."""
    if attacker.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=attacker.lora_r,
        lora_alpha=attacker.lora_alpha,
        lora_dropout=attacker.lora_dropout,
        target_modules=attacker.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to answer
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n_lora


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in forward matmuls: all but the input embedding table (a
    lookup), plus the output head even when it is tied to that table (its matmul runs either
    way). LoRA adapters are left out: budget.flops_per_token counts them apart."""
    embedding = model.get_input_embeddings()
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    n = sum(p.numel() for name, p in model.named_parameters() if id(p) not in skip and "lora_" not in name)
    head = model.get_output_embeddings()
    if head is not None:  # weights tied to the input table were skipped above: count them once here
        n += sum(p.numel() for p in head.parameters() if id(p) in skip)
    return n
