"""A defence's PEFT LoRA adapter against the model it is merged into, from the driver: the
adapter's tensor shapes (its file's header, no weights) against the modules of the model built
on the meta device. A mismatch is one `spec error:` line instead of a size-mismatch dump in
every trial."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.spec.model import SpecError

# a LoRA tensor's key, less PEFT's `base_model.model.` prefix: the module, then which factor
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                     r"lora_magnitude_vector)$")
# which of a module's (in, out) features each factor's shape holds, and at which axis:
# lora_A is [r, in], lora_B [out, r], an embedding's A [r, vocab] and B [dim, r], DoRA's magnitude [out]
_AXIS = {"lora_A.weight": ("in", 1), "lora_B.weight": ("out", 0), "lora_embedding_A": ("in", 1),
         "lora_embedding_B": ("out", 0), "lora_magnitude_vector": ("out", 0)}


def check(model, folder: Path, where: str) -> None:
    """SpecError naming `where`.adapter, the module and both shapes, at the first tensor of the
    LoRA adapter in `folder` that does not fit `model` (a meta-device build of `where`.model),
    or at a module it names that the model lacks. Other PEFT kinds are left to PEFT."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return
    trained_on = config.get("base_model_name_or_path")
    fix = "give the adapter trained on this model, or the model it was trained on" + \
        (f" ({trained_on})" if trained_on else "")
    mine: dict[str, dict[str, int]] = {}
    for key, shape in tensor_shapes(folder).items():
        key = key.removeprefix("base_model.model.")
        if m := _FACTOR.match(key):
            side, axis = _AXIS[m["factor"]]
            mine.setdefault(m["module"], {})[side] = shape[axis] if len(shape) > axis else -1
            continue
        # a whole parameter (modules_to_save, a saved embedding layer): its shape as the model's
        name, _, param = key.rpartition(".")
        module = _module(model, name.removesuffix(".base_layer"), where, fix)
        theirs = tuple(getattr(module, param).shape) if hasattr(module, param) else None
        if theirs != shape:
            raise SpecError(f"spec error: {where}.adapter: parameter {key} is {_dims(theirs)} in {where}.model "
                            f"but {_dims(shape)} in the adapter; {fix}")
    for name, sides in mine.items():
        features = _features(_module(model, name, where, fix))
        if features is None:
            continue
        if any(features[s] != n for s, n in sides.items()):
            trained = "x".join(str(sides.get(s, "?")) for s in ("in", "out"))
            raise SpecError(f"spec error: {where}.adapter: module {name} is {features['in']}x{features['out']} "
                            f"(in x out) in {where}.model but the adapter was trained on {trained}; {fix}")


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the adapter's weights, read from the safetensors header, or from
    adapter_model.bin loaded onto the meta device (no data either way)."""
    file = folder / "adapter_model.safetensors"
    if file.exists():
        from safetensors import safe_open

        with safe_open(file, framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    file = folder / "adapter_model.bin"
    if file.exists():
        import torch

        state = torch.load(file, map_location="meta", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    return {}


def _module(model, name: str, where: str, fix: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SpecError(f"spec error: {where}.adapter: the adapter holds module {name}, which {where}.model "
                        f"has not (other layers or another architecture); {fix}") from None


def _features(module) -> dict[str, int] | None:
    """A module's in and out features as LoRA sees them (Linear, Embedding, Conv, GPT-2's Conv1D)."""
    for a, b in (("in_features", "out_features"), ("num_embeddings", "embedding_dim"),
                 ("in_channels", "out_channels"), ("nx", "nf")):
        if hasattr(module, a) and hasattr(module, b):
            return {"in": getattr(module, a), "out": getattr(module, b)}
    return None


def _dims(shape: tuple | None) -> str:
    return "absent" if shape is None else "x".join(str(n) for n in shape) or "a scalar"
