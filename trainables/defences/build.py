"""Build a defence: train a starting checkpoint with a defence method (build:), and write an ordinary
checkpoint folder (safetensors, tokenizer, defence.json) that the sweep attacks and a user can take
elsewhere.

A build is cached by content: its key digests the starting checkpoint's files, the data's rows,
the method, its options, the training fields, the data formatting and the code of this package. A
second build with the same key finds the folder; any change builds anew (into a new folder,
unless the spec names the folder). The folder is written under a temporary name and renamed when
complete, under a file lock: an interrupted build leaves no folder that looks finished, and two
processes never build the same key twice."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.config import Checkpoint, Data, DataSource
from trainables.defences.config import Build

MANIFEST = "defence.json"
"""The build's record inside its folder: key, method, options, data, budget, per-step terms."""
VERSION = 1
"""Bumped when the folder's layout or the key's parts change."""


class BuildError(RuntimeError):
    """A build that cannot go on, phrased for the user (one line)."""


@dataclass(frozen=True)
class Built:
    folder: Path
    manifest: dict[str, Any]
    cached: bool
    """True when the folder was there already (a cache hit)."""


# --- the key ------------------------------------------------------------------------------------

def _digest_files(root: Path) -> str:
    """The content of a file or folder: every file's relative name and bytes."""
    h = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        h.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(functools.partial(f.read, 1 << 22), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def start_identity(start: Checkpoint) -> dict[str, Any]:
    """The starting checkpoint as the key holds it: a built defence by its own key, a local folder
    by its files' content, a hub id by id and revision (its files are not read here)."""
    fields = start.model_dump(exclude={"model", "adapter", "tokenizer"})
    out: dict[str, Any] = {"settings": fields}
    for part in ("model", "adapter", "tokenizer"):
        value = getattr(start, part)
        if value is None:
            continue
        path = Path(value).expanduser()
        if (path / MANIFEST).is_file():
            out[part] = {"built": json.loads((path / MANIFEST).read_text())["key"]}
        elif path.exists():
            out[part] = {"files": _digest_files(path)}
        else:
            out[part] = {"hub": value}
    return out


def rows_of(src: DataSource, domains: list[str] | None = None) -> list[dict[str, str]]:
    """A role's rows as {"prompt", "response"} (the source's fields), in file order; with `domains`,
    those whose src.domain_field is one of them."""
    from trainables.data import load_rows

    if src.response_field is None:
        raise BuildError(f"source {src.source!r}: a defender's split needs answers; set its response_field")
    return [{"prompt": str(r[src.prompt_field]), "response": str(r[src.response_field])} for r in load_rows(src)
            if domains is None or str(r.get(src.domain_field)) in domains]


@functools.lru_cache(maxsize=1)
def _code() -> str:
    """This package's source: a changed method or builder must not read an old build."""
    from trainables.cache import source_digest

    return source_digest(Path(__file__).resolve().parent)


def key_of(build: Build, start: Checkpoint, data: Data, rows: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """Everything the built weights depend on (the key's digest names the folder)."""
    return {
        "version": VERSION,
        "start": start_identity(start),
        "data": {role: hashlib.sha256(json.dumps(r, ensure_ascii=False).encode()).hexdigest()
                 for role, r in sorted(rows.items())},
        "format": data.model_dump(mode="json", include={"chat_template", "prompt_format", "max_length",
                                                        "system_prompt"}),
        "build": build.model_dump(mode="json", by_alias=True, exclude={"from_", "data", "options"})
        | {"finetune": build.mode},
        "options": build.method_options().model_dump(mode="json"),
        "code": _code(),
    }


def digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def folder_for(build: Build, key: str, root: Path | None = None) -> Path:
    """Where a build goes unless the spec names a folder: <root>/defences/<method>-<key>, root being
    attack-sweep's cache ($ATTACK_SWEEP_CACHE, else ~/.cache/attack-sweep) unless given."""
    from trainables.cache import cache_root

    return Path(root or cache_root()) / "defences" / f"{build.method}-{key[:16]}"


def manifest_of(folder: Path) -> dict[str, Any] | None:
    """The finished build in `folder`, None when there is none."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


# --- the build ----------------------------------------------------------------------------------

def build(config: Build, start: Checkpoint, data: Data, folder: Path | None = None, device: str = "auto",
          log: Callable[[str], None] = print, cache: Path | None = None) -> Built:
    """Build (or find) the defence: `config` trains `start` on its data, formatted as `data` says;
    the result goes to `folder` (default: the folder for its key in `cache`, else attack-sweep's
    cache: the sweep passes its driver's, so a Ray worker builds where the driver looks)."""
    from filelock import FileLock

    rows = {role: rows_of(src, config.domains if role != "benign" else None)
            for role, src in config.data.given().items()}
    for role, r in rows.items():
        if not r:
            within = f" of the domains {', '.join(config.domains)}" if config.domains and role != "benign" else ""
            raise BuildError(f"data.{role}: {config.data.given()[role].source!r} holds no rows{within}")
    key = key_of(config, start, data, rows)
    name = digest(key)
    folder = Path(folder).expanduser() if folder else folder_for(config, name, cache)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        found = manifest_of(folder)
        if found is not None and found.get("key") == name:
            return Built(folder, found, cached=True)
        if folder.exists() and found is None:
            raise BuildError(f"{folder} exists and is not a built defence (no {MANIFEST}); remove it or name "
                             "another folder")
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            manifest = _train(config, start, data, rows, tmp, device, log)
            manifest |= {"key": name, "key_parts": key, "from": config.from_, "data_sources": {
                role: src.model_dump(mode="json") for role, src in config.data.given().items()}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            if folder.exists():   # an older build of this defence, in the folder the spec names
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Built(folder, manifest, cached=False)


def _train(config: Build, start: Checkpoint, data: Data, rows: dict[str, list[dict[str, str]]], out: Path,
           device_name: str, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from trainables import data as D
    from trainables.budget import Budget, flops_per_token
    from trainables.checkpoint import load_model, load_tokenizer, make_trainable, matmul_params, resolve_device
    from trainables.defences import method_class
    from trainables.methods.base import Rates
    from trainables.optim import build_optimizer, build_scheduler, evaluating

    torch.manual_seed(config.seed)
    device = resolve_device(device_name)
    training = config.training()
    tokenizer = load_tokenizer(start)
    model, n_lora = make_trainable(load_model(start, device), training)
    n = matmul_params(model)
    rates = Rates(train=flops_per_token(n, n_lora), forward=2 * n)
    cls = method_class(config.method)
    method = cls(config.method_options(), model, rates, config.seed)
    streams = method.streams(rows, tokenizer, data)
    for stream, items in streams.items():
        if not items:
            raise BuildError(f"method {config.method}: its {stream!r} stream is empty; give it rows")
    batches = {s: D.BatchStream(items, config.batch_size, config.seed, tokenizer.pad_token_id,
                                collate=functools.partial(method.collate, s)) for s, items in streams.items()}

    def draw(stream: str, i: int) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batches[stream][i].items()}

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, training)
    scheduler = build_scheduler(optimizer, training, config.steps)
    budget, history, every = Budget(), [], max(1, config.steps // 10)
    model.train()
    start_time = time.monotonic()
    log(f"  building {config.method} ({training.finetune}, {config.steps} steps) from {config.from_} ...")
    for index in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        t0 = time.monotonic()
        step = method.step(model, draw, index)
        loss = step.terms.get("loss", math.nan)
        if not math.isfinite(loss):
            raise BuildError(f"step {index + 1}: the {config.method} loss is {loss}; lower build.learning_rate "
                             f"(now {config.learning_rate:g}) or the method's options")
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        budget.spend(step.spent)
        budget.add_time(time.monotonic() - t0)
        history.append({"step": index + 1, **step.terms})
        if (index + 1) % every == 0 or index + 1 == config.steps:
            terms = "  ".join(f"{k} {v:.4g}" for k, v in step.terms.items())
            log(f"    step {index + 1}/{config.steps}  {terms}  ({time.monotonic() - start_time:.0f} s)")
    model.eval()
    with evaluating(optimizer), torch.no_grad():
        released = model.merge_and_unload() if n_lora is not None else model
        released.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"version": VERSION, "method": config.method, "options": config.method_options().model_dump(mode="json"),
            "finetune": training.finetune, "official_finetune": cls.official_finetune,
            "training": config.model_dump(mode="json", by_alias=True, exclude={"data", "options"}),
            "budget": {"steps": budget.steps, "examples": budget.examples, "tokens": budget.tokens,
                       "flops": budget.flops, "accelerator_seconds": budget.accelerator_seconds},
            "seconds": round(time.monotonic() - start_time, 2), "history": history,
            "rows": {role: len(r) for role, r in rows.items()},
            "streams": {s: len(items) for s, items in streams.items()}, "device": str(device)}
