"""Checking a defence's checkpoint from the driver, cheaply, before Ray starts: the config and
tokenizer are loaded, never the weights. Each problem becomes one `spec error:` line naming the
field, instead of the same traceback in every trial."""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.spec import adapters
from orchestrator.spec.model import Defence, SpecError, SweepSpec
from orchestrator.spec.paths import not_found, written_as_path

# the file each kind of checkpoint must hold: how a hub id is probed, and a local folder recognised
_MARKER = {"model": "config.json", "adapter": "adapter_config.json", "tokenizer": "tokenizer_config.json"}
SKIP_HINT = "or pass --skip-checkpoint-checks if only the Ray workers can see it"
CONFIG_FIX = "fix its config.json, or re-save the model with save_pretrained"


def check(spec: SweepSpec) -> list[str]:
    """Check every defence's checkpoint; raise SpecError on the first problem, return notes."""
    notes: list[str] = []
    targets = _lora_targets(spec)
    seen: dict[tuple, None] = {}
    for i, d in enumerate(spec.defences):
        d = spec.release_source(d)   # a defence the sweep builds: the checkpoint it starts from
        key = (d.model, d.revision, d.adapter, d.tokenizer, d.trust_remote_code)
        if key in seen:
            continue
        seen[key] = None
        try:
            notes += check_defence(d, f"defences.{i}", targets, spec.data.chat_template)
        except SpecError as err:   # a build's start, named as the spec names it
            if spec.defences[i].build is None or d.name != spec.defences[i].name:
                raise
            raise SpecError(str(err).replace(f"defences.{i}.model", f"defences.{i}.build.from")) from None
        if not spec.data.chat_template and True in dict(spec.space)["chat_template"].values:  # issue 25
            _tokenizer(d, d.tokenizer or d.model, f"defences.{i}.model", True, "space.chat_template",
                       "drop true from space.chat_template")
    return notes


def check_defence(d: Defence, where: str, lora_targets: list, chat_template: bool) -> list[str]:
    notes = []
    model_dir = locate(d.model, "model", f"{where}.model", d.revision)
    config = _config(d, model_dir, where)
    if model_dir is not None:
        _check_weights(Path(model_dir), f"{where}.model")
    else:
        notes.append(f"{where}.model: {d.model!r} is read from the hub; its weight files are not checked here")
    if d.adapter:
        adapter_dir = locate(d.adapter, "adapter", f"{where}.adapter", None)
        _adapter(d.adapter, adapter_dir, f"{where}.adapter")
        if adapter_dir is None:
            notes.append(f"{where}.adapter: {d.adapter!r} is read from the hub; its shapes are not checked here")
        elif config is not None:
            adapters.check(_meta_model(d, config, where), Path(adapter_dir), where)
    tok_source = d.tokenizer or d.model
    if d.tokenizer:
        locate(d.tokenizer, "tokenizer", f"{where}.tokenizer", None)
    _tokenizer(d, tok_source, f"{where}.tokenizer" if d.tokenizer else f"{where}.model", chat_template)
    if lora_targets and config is not None:
        _lora(d, config, lora_targets, where)
    return notes


def locate(value: str, kind: str, where: str, revision: str | None) -> str | None:
    """The local folder `value` names, None for a hub id that resolves (in the local hub cache
    or on the hub); SpecError, naming both readings, when it is neither."""
    path = Path(value).expanduser()
    if path.exists():
        if path.is_dir() and not (path / _MARKER[kind]).exists():
            raise SpecError(f"spec error: {where}: {value!r} is a folder without {_MARKER[kind]}; "
                            f"give the folder that holds the {kind}")
        return str(path)
    if written_as_path(value):
        raise SpecError(not_found(where, value, "path", f"fix the path, {SKIP_HINT}"))
    why = _hub_problem(value, _MARKER[kind], revision)
    if why is None:
        return None
    raise SpecError(f"spec error: {where}: {value!r} is neither a local path (nothing there, next to the "
                    f"spec or in the current directory) nor a hub {kind} "
                    f"({why}); fix the path or the id, {SKIP_HINT}")


def hub_offline() -> str | None:
    """Why the hub is out of reach (HF_HUB_OFFLINE, or no connection to its host within 5 s), or
    None. A hub id found in the local cache is then read from the cache alone: transformers would
    otherwise list the repository's files on the hub, retrying for minutes with no network."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    reason = _probe(host)
    return f"the hub {host} cannot be reached: {reason}" if reason else None


@functools.lru_cache(maxsize=4)
def _probe(host: str) -> str | None:
    """One connection attempt per host and process: a spec with several defences waits once."""
    return unreachable(host, 443, timeout=5.0)


def _hub_problem(repo: str, marker: str, revision: str | None) -> str | None:
    """Why `repo` does not resolve as a hub id, or None when it does."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return "not a valid hub id either"
    try:
        hf_hub_download(repo, marker, revision=revision, local_files_only=True)
        return None
    except (FileNotFoundError, OSError, ValueError):
        pass
    if reason := hub_offline():
        if reason.startswith("HF_HUB_OFFLINE"):
            return "HF_HUB_OFFLINE is set and it is not in the local hub cache; unset HF_HUB_OFFLINE to download it"
        return reason
    try:
        hf_hub_download(repo, marker, revision=revision, etag_timeout=10)
        return None
    except GatedRepoError:
        return "it is gated: accept its terms on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        return "no such repository on the hub, or it is private and HF_TOKEN is not set"
    except RevisionNotFoundError:
        return f"the hub has no revision {revision!r}"
    except Exception as err:  # noqa: BLE001 - any other hub answer, in one line
        return f"{marker} could not be fetched: {_first_line(err)}"


def unreachable(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to host:port fails within `timeout`, or None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as err:
        return f"name not resolved ({err.strerror or err})"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err)


def _config(d: Defence, model_dir: str | None, where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir or d.model, revision=d.revision,
                                          trust_remote_code=d.trust_remote_code,
                                          local_files_only=model_dir is None and hub_offline())
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise SpecError(f"spec error: {where}.trust_remote_code: {d.model!r} ships its own model code; "
                            "set trust_remote_code: true only if you trust its author") from None
        raise SpecError(f"spec error: {where}.model: cannot read the config of {d.model!r}: "
                        f"{_first_line(err).rstrip('.')}; {CONFIG_FIX}") from None
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise SpecError(f"spec error: {where}.model: cannot read the config of {d.model!r}: "
                        f"{_first_line(err).rstrip('.')}; {CONFIG_FIX}") from None


def _check_weights(folder: Path, where: str) -> None:
    """Weight files present and whole (headers only: nothing is loaded)."""
    index = next((p for p in (folder / "model.safetensors.index.json",
                              folder / "pytorch_model.bin.index.json") if p.exists()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise SpecError(f"spec error: {where}: {index} is not a valid weight index ({_first_line(err)}); "
                            "re-save or re-download the checkpoint") from None
        if missing := [s for s in shards if not (folder / s).exists()]:
            raise SpecError(f"spec error: {where}: shard {folder / missing[0]} named in {index.name} is missing "
                            f"({len(missing)} of {len(shards)}); re-download the checkpoint")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise SpecError(f"spec error: {where}: no weights in {folder} (model.safetensors or "
                            "pytorch_model.bin); save the model with save_pretrained")
    for file in files:
        problem = safetensors_problem(file) if file.suffix == ".safetensors" else _bin_problem(file)
        if problem:
            raise SpecError(f"spec error: {where}: {file} {problem}; re-save or re-download the checkpoint")


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is not whole (its header unreadable, or shorter than the tensors
    its header lists), or None."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:  # safetensors caps its header at 100 MB: these are not its bytes
                raise ValueError
            if n > size - 8:
                return f"is truncated ({size:,} bytes; its header alone is {n:,})"
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "has no readable safetensors header (not a safetensors file, or damaged)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        return f"is truncated ({size:,} bytes; its header lists {8 + n + end:,})"
    return None


def _bin_problem(file: Path) -> str | None:
    if not zipfile.is_zipfile(file):
        return "is not a readable PyTorch archive (truncated or damaged)"
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        return f"is damaged ({_first_line(err)})"
    return f"is damaged (member {bad} fails its checksum)" if bad else None


def _adapter(value: str, folder: str | None, where: str) -> None:
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(folder or value)
    except Exception as err:  # noqa: BLE001 - peft raises several kinds; the message is what matters
        raise SpecError(f"spec error: {where}: cannot read the PEFT adapter {value!r}: {_first_line(err)}; give "
                        "the folder the adapter was saved to (save_pretrained)") from None
    if folder is not None:
        for file in Path(folder).glob("*.safetensors"):
            if problem := safetensors_problem(file):
                raise SpecError(f"spec error: {where}: {file} {problem}; re-save the adapter")


def _tokenizer(d: Defence, source: str, where: str, chat_template: bool, field: str = "data.chat_template",
               fix: str = "set data.chat_template: false (prompts are then wrapped by data.prompt_format)") -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=None if d.tokenizer else d.revision,
                                            trust_remote_code=d.trust_remote_code,
                                            local_files_only=not Path(source).expanduser().exists() and hub_offline())
    except Exception as err:  # noqa: BLE001 - tokenizers fail in many ways; one line names the source
        raise SpecError(f"spec error: {where}: cannot load a tokenizer from {source!r}: {_first_line(err)}; "
                        "give defences[].tokenizer") from None
    if chat_template and not getattr(tok, "chat_template", None):
        raise SpecError(f"spec error: {field}: the tokenizer of {where.split('.')[0]}."
                        f"{where.split('.')[1]} ({source!r}) has no chat template; {fix} or give a tokenizer "
                        "with one")


def _lora_targets(spec: SweepSpec) -> list:
    """Each distinct lora_target_modules an attacker of this sweep can fine-tune with."""
    space = dict(spec.space)
    if "lora" not in space["finetune"].values_or_range():
        return []
    out: list = []
    for value in space["lora_target_modules"].values_or_range():
        if value not in out:
            out.append(value)
    return out


def _meta_model(d: Defence, config, where: str):
    """The defence's architecture built on the meta device: its modules and shapes, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, trust_remote_code=d.trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise SpecError(f"spec error: {where}.model: {d.model!r} is not a causal language model "
                        f"transformers can build ({_first_line(err)}); give a checkpoint "
                        "AutoModelForCausalLM loads") from None


def _lora(d: Defence, config, targets: list, where: str) -> None:
    """Wrap the architecture, built on the meta device, as a trial would, for each target list."""
    import torch
    from peft import LoraConfig, get_peft_model

    for target in targets:
        model = _meta_model(d, config, where)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                get_peft_model(model, LoraConfig(r=1, target_modules=target, task_type="CAUSAL_LM"))
        except (ValueError, TypeError, RuntimeError) as err:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear)} - {""})
            raise SpecError(f"spec error: space.lora_target_modules: {target!r} does not fit {where} "
                            f"({d.model!r}): {_first_line(err)[:200].rstrip('.')}; name some of its linear layers ("
                            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}) or use all-linear") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].strip()
