"""The step-0 reading, measured once per checkpoint and shared by the trials that attack it."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.cache import cache_root

if TYPE_CHECKING:
    import torch

    from trainables.config import AttackConfig
    from trainables.evaluators import EvalItem, Scores

ENV = "ATTACK_SWEEP_STEP0_CACHE"
FORMAT = 1
"""Layout of a cache file; a file of another layout is a miss."""
SCHEDULE_FIELDS = frozenset({"eval_every", "eval_schedule", "refine", "max_steps"})
"""Evaluation fields that only place later points: never part of the key."""
BESIDE_READING = frozenset({"g_effect"})
"""Evaluation fields measured beside the reading (the G-effect probe), never part of it."""
UNREAD_DATA = frozenset({"attack", "benign", "refusal"})
"""data fields the step-0 reading never reads (splits and answers trained on)."""
WRAP_FIELDS = ("finetune", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
"""The attacker fields checkpoint.make_trainable reads: how the release is wrapped before step 0."""


def enabled() -> bool:
    """On unless ATTACK_SWEEP_STEP0_CACHE is 0, false, no or off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """$ATTACK_SWEEP_CACHE/step0, else ~/.cache/attack-sweep/step0."""
    return cache_root() / "step0"


def why_not(cfg: AttackConfig) -> str | None:
    """Why this trial's step 0 cannot be shared, or None when it can."""
    from trainables.evaluators.base import _REGISTRY  # the factories, to see where each was registered

    if not enabled():
        return f"{ENV}=0"
    if cfg.deepspeed is not None:
        return "a DeepSpeed trial"
    for e in cfg.all_evaluators:
        factory = _REGISTRY[e.name][0]
        if not factory.__module__.startswith("trainables.evaluators."):
            return f"evaluator {e.key!r} is registered outside trainables/evaluators"
        if e.name == "judge" and e.options.get("backend") != "transformers":
            return f"evaluator {e.key!r} is a judge behind a server"
    return None


# --- the key ------------------------------------------------------------------------------------

def _files(path: str | None) -> list[list] | None:
    """A local file or directory by its files (relative name, size, mtime in ns): what changes when
    a checkpoint is rewritten. None when `path` is not local (a hub id)."""
    if path is None:
        return None
    root = Path(path).expanduser()
    if root.is_file():
        st = root.stat()
        return [[root.name, st.st_size, st.st_mtime_ns]]
    if not root.is_dir():
        return None
    out = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            st = (Path(folder) / name).stat()
            out.append([str((Path(folder) / name).relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def _source(path: str | None, revision: str | None, marker: str) -> Any:
    """A model source as the key holds it: a local path's files, else the hub cache's resolved
    snapshot of `marker` (its path names the commit), else the id alone."""
    if path is None:
        return None
    local = _files(path)
    if local is not None:
        return {"path": str(Path(path).expanduser().resolve()), "files": local}
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, marker, revision=revision)
    except Exception:  # noqa: BLE001 - a key part, never a reason to fail the trial
        found = None
    return {"hub": path, "revision": revision, "snapshot": found if isinstance(found, str) else None}


@functools.lru_cache(maxsize=1)
def _code() -> str:
    """Digest of this package's source: a changed evaluator or generation must not read old files."""
    from trainables.cache import source_digest

    return source_digest(Path(__file__).resolve().parent)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "tokenizers", "peft", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _items(items: list[EvalItem]) -> str:
    text = json.dumps([[it.prompt, it.response, it.raw_prompt] for it in items], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def payload(cfg: AttackConfig, device: torch.device, model, tokenizer, eval_items: list[EvalItem]) -> dict:
    """Everything that can change this trial's step-0 reading, as JSON values (see the module)."""
    import torch

    from trainables.evaluators import validate_options

    ck = cfg.checkpoint
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    evaluation = cfg.model_dump(mode="json", exclude={*SCHEDULE_FIELDS, *BESIDE_READING, "device", "checkpoint",
                                                      "attacker", "deepspeed", "data", "evaluator", "evaluators"})
    evaluation["data"] = cfg.data.model_dump(mode="json", exclude=set(UNREAD_DATA))
    for split in (evaluation["data"]["eval"], (evaluation.get("utility") or {}).get("data") or {}):
        split.pop("rejected_field", None)  # issue 25: DPO's rejected answers are trained on, never read here
    evaluation["evaluators"] = [  # options with their defaults: one reading however they are spelt
        {**e.model_dump(mode="json"), "options": validate_options(e.name, e.options).model_dump(mode="json")}
        for e in cfg.all_evaluators]
    utility_items = None
    if cfg.utility is not None:
        from trainables.utility import utility_items as read

        utility_items = _items(read(cfg.utility, tokenizer, cfg.data))
    evaluator_files = {}
    for e in cfg.all_evaluators:
        found = {k: _source(v, e.options.get("revision"), "config.json") for k, v in e.options.items()
                 if isinstance(v, str) and (k == "model" or _files(v) is not None)}
        evaluator_files[e.key] = found
    wrap = {f: getattr(cfg.attacker, f) for f in WRAP_FIELDS if cfg.attacker.finetune == "lora" or f == "finetune"}
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    raw = {
        "format": FORMAT,
        "checkpoint": ck.model_dump(mode="json"),
        "model": _source(ck.model, ck.revision, "config.json"),
        "commit": getattr(getattr(base, "config", None), "_commit_hash", None),
        "adapter": _source(ck.adapter, None, "adapter_config.json"),
        "tokenizer": _source(ck.tokenizer, None, "tokenizer_config.json"),
        "wrap": wrap,
        "trigger": cfg.attacker.trigger,  # issue 25: the prompts are also scored with it
        "evaluation": evaluation,
        "eval_items": _items(eval_items),
        "utility_items": utility_items,
        "evaluator_files": evaluator_files,
        "device": {"trial": str(device), "cuda": cuda, "cuda_version": torch.version.cuda,
                   "threads": torch.get_num_threads(), "matmul": torch.get_float32_matmul_precision()},
        "versions": _versions(),
        "code": _code(),
    }
    return json.loads(json.dumps(raw))  # tuples as lists: what a file gives back


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --- the file -----------------------------------------------------------------------------------

def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole or is left as it was: a reader never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _scores_json(s: Scores) -> dict:
    return {"f": s.f, "verdicts": s.verdicts, "is_binary": s.is_binary, "malformed": s.malformed,
            "extra": s.extra, "unscored": s.unscored, "ungated": s.ungated, "incoherent": s.incoherent}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scores(raw: Any, n: int) -> Scores:
    """A stored Scores, checked field by field (ValueError when it is not one of n items)."""
    from trainables.evaluators import Scores

    ok = (isinstance(raw, dict) and _number(raw.get("f")) and isinstance(raw.get("is_binary"), bool)
          and isinstance(raw.get("malformed"), int) and isinstance(raw.get("unscored"), int)
          and isinstance(raw.get("extra"), dict) and all(_number(v) for v in raw["extra"].values()))
    verdicts = raw.get("verdicts") if ok else None
    if not ok or not (verdicts is None or (isinstance(verdicts, list) and len(verdicts) == n
                                           and all(v is None or _number(v) for v in verdicts))):
        raise ValueError("not a Scores")
    # the coherence gate's per-item record (absent where no gate applied)
    ungated, incoherent = raw.get("ungated"), raw.get("incoherent")
    if not (ungated is None or (isinstance(ungated, list) and len(ungated) == n
                                and all(v is None or _number(v) for v in ungated))) \
            or not (incoherent is None or (isinstance(incoherent, list) and len(incoherent) == n
                                           and all(isinstance(v, bool) for v in incoherent))):
        raise ValueError("not a Scores")
    return Scores(raw["f"], verdicts, raw["is_binary"], raw["malformed"], raw["extra"], raw["unscored"],
                  ungated=ungated, incoherent=incoherent)


class Step0Cache:
    """One trial's entry: `get` what an earlier trial stored under its key, `put` its own."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = key
        self.path = (root or cache_dir()) / f"{digest(key)}.json"

    @classmethod
    def for_trial(cls, cfg: AttackConfig, device: torch.device, model, tokenizer,
                  eval_items: list[EvalItem]) -> Step0Cache | None:
        """This trial's entry, or None where its step 0 cannot be shared (`why_not`)."""
        if why_not(cfg) is not None:
            return None
        try:
            return cls(payload(cfg, device, model, tokenizer, eval_items))
        except OSError as err:  # a checkpoint file gone while its folder was listed: measure, as without
            warnings.warn(f"step-0 cache: cannot fingerprint this trial's files ({err}); measuring step 0",
                          stacklevel=2)
            return None

    def get(self, labels: list[str], n: int) -> tuple[dict[str, Scores], float, list[str | None] | None] | None:
        """The stored reading (scores by label in `labels` order, utility, responses) if a whole
        one of this key, these evaluators and n items is there; None otherwise."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        try:
            if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("key") != self.key:
                raise ValueError("another key")
            reading = raw["reading"]
            if list(reading["scores"]) != labels:
                raise ValueError("other evaluators")
            scores = {label: _scores(reading["scores"][label], n) for label in labels}
            utility, responses = reading["utility"], reading["responses"]
            if not _number(utility) or not (responses is None or (
                    isinstance(responses, list) and len(responses) == n
                    and all(r is None or isinstance(r, str) for r in responses))):
                raise ValueError("not a reading")
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return scores, utility, responses

    def put(self, scores: dict[str, Scores], utility: float, responses: list[str | None] | None,
            seconds: float) -> None:
        """Store this trial's reading (`seconds`: what measuring it took, for whoever reads the file)."""
        try:
            text = json.dumps({"format": FORMAT, "key": self.key, "written": time.time(),
                               "measured_seconds": seconds if math.isfinite(seconds) else None,
                               "reading": {"scores": {k: _scores_json(s) for k, s in scores.items()},
                                           "utility": utility, "responses": responses}}, ensure_ascii=False)
            write_atomically(self.path, text)
        except (OSError, ValueError, TypeError) as err:  # unwritable, or text JSON cannot hold: not shared
            warnings.warn(f"step-0 cache: cannot write {self.path} ({err}); trials of this checkpoint will "
                          f"each measure step 0 (set ATTACK_SWEEP_CACHE to a writable folder, or {ENV}=0)",
                          stacklevel=2)
