"""A spec file read into a SweepSpec: YAML, `--set` overrides and overlays, paths made absolute,
`${NAME}` and `toyworld:` expanded, and pydantic's errors phrased one line each.

    attack-sweep validate search_spaces/quickstart.yaml

    spec error: space.finetune: choice[1]: Input should be 'lora' or 'full' (got 'qlora')
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.spec.model import SpecError, SweepSpec, unknown_key
from orchestrator.spec.paths import DATA_FIX, missing, not_found
from trainables.messages import explain, field_at


def apply_overrides(raw: dict, overrides: list[str | tuple[str, Any]]) -> dict:
    """Apply `key.path=value` overrides; the value is parsed as YAML (numbers, lists, maps).
    List items are addressed by index: `defences.0.model=./ckpt`. A (key, value) pair is
    applied as it is (from an overlay file)."""
    for item in overrides:
        if isinstance(item, tuple):
            key, parsed = item
        elif "=" not in item:
            raise SpecError(f"error: --set {item!r}: expected KEY=VALUE, e.g. --set max_steps=50")
        else:
            key, value = item.split("=", 1)
            parsed = yaml.safe_load(value) if value.strip() else None
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]))
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise SpecError(f"error: --set {key}: {'.'.join(parts[:-1])} is not a mapping or list")
    return raw


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SpecError(f"error: --set {where}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise SpecError(f"error: --set {where}: its parent is not a mapping or list")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


TOYWORLD = "toyworld:"
_ENV_VAR = re.compile(r"\$\{(\w+)\}")


def _expand_env(value: str, where: str) -> str:
    """`${NAME}` in a path is the environment variable NAME (e.g. a scratch directory on a
    cluster, or where examples/smollm2 built its checkpoints); an unset one is an error."""

    def var(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise SpecError(f"spec error: {where}: environment variable {name} is not set "
                            f"(used in {value!r}); export it or replace ${{{name}}} with a path")
        return os.environ[name]

    return _ENV_VAR.sub(var, value)


def _resolve_paths(raw: dict, base_dir: Path) -> None:
    """Relative paths that exist next to the spec file (else in the current directory) are made
    absolute, so Ray workers (whose working directory is their trial's) and `ray job submit`
    find them; `${NAME}` is expanded from the environment;
    `toyworld:NAME` is NAME inside the embedded toy world (built on first use); anything
    else stays as given (a hub id). A data source written as a path (paths.written_as_path)
    that is not there is a SpecError: the driver reads every split before Ray starts."""

    def fix(d: dict, key: str, where: str, data: bool = False) -> None:
        value = d.get(key)
        if isinstance(value, str) and "${" in value:
            value = d[key] = _expand_env(value, f"{where}.{key}")
        if isinstance(value, str) and value.startswith(TOYWORLD):
            from orchestrator.spec import toyworld

            try:
                d[key] = str(toyworld.build() / value.removeprefix(TOYWORLD))
            except OSError as err:
                raise SpecError(f"spec error: {where}.{key}: cannot build the toy world under "
                                f"{toyworld.cache_dir()} ({err.strerror or err}: {err.filename}); set "
                                "ATTACK_SWEEP_CACHE to a writable folder") from None
        elif isinstance(value, str) and value.startswith("~"):
            d[key] = str(Path(value).expanduser())
        elif isinstance(value, str) and not Path(value).is_absolute():
            found = next((c for c in (base_dir / value, Path(value)) if c.exists()), None)
            if found is not None:
                d[key] = str(found.resolve())
        value = d.get(key)
        if data and isinstance(value, str) and missing(value):
            raise SpecError(not_found(f"{where}.{key}", value, "file", DATA_FIX, base_dir))

    names = {d.get("name") for d in raw.get("defences") or [] if isinstance(d, dict)}
    for i, d in enumerate(raw.get("defences") or []):
        if isinstance(d, dict):
            for key in ("model", "adapter", "tokenizer"):
                fix(d, key, f"defences.{i}")
            if isinstance(d.get("defender_data"), dict):
                fix(d["defender_data"], "source", f"defences.{i}.defender_data", data=True)
            build = d.get("build")
            if isinstance(build, dict):   # issue 29: a defence the sweep builds
                if build.get("from") not in names:   # a defence's name stays a name
                    fix(build, "from", f"defences.{i}.build")
                for role, src in (build.get("data") or {}).items() if isinstance(build.get("data"), dict) else ():
                    if isinstance(src, dict):
                        fix(src, "source", f"defences.{i}.build.data.{role}", data=True)
    if isinstance(raw.get("deepspeed"), dict) and isinstance(raw["deepspeed"].get("config"), str):
        fix(raw["deepspeed"], "config", "deepspeed")
        path = Path(raw["deepspeed"]["config"]).expanduser()
        if not path.is_absolute():
            raw["deepspeed"]["config"] = str((base_dir / path).resolve())
    data = raw.get("data") or {}
    for split in ("attack", "eval", "benign"):
        if isinstance(data.get(split), dict):
            fix(data[split], "source", f"data.{split}", data=True)
    utility = raw.get("utility")
    if isinstance(utility, dict) and isinstance(utility.get("data"), dict):
        fix(utility["data"], "source", "utility.data", data=True)
    conditions = raw.get("conditions")
    if isinstance(conditions, dict):
        trainability = conditions.get("trainability")
        for split in ("data", "eval"):
            if isinstance(trainability, dict) and isinstance(trainability.get(split), dict):
                fix(trainability[split], "source", f"conditions.trainability.{split}", data=True)
        stability = conditions.get("stability")
        if isinstance(stability, dict) and isinstance(stability.get("lm_eval"), dict):
            fix(stability["lm_eval"], "include_path", "conditions.stability.lm_eval")
    listed = [("evaluator", raw.get("evaluator"))] + [
        (f"evaluators.{i}", e) for i, e in enumerate(raw.get("evaluators") or [])]
    for where, ev in listed:  # a classifier's or a judge's model may sit next to the spec
        if isinstance(ev, dict) and isinstance(ev.get("options"), dict):
            fix(ev["options"], "model", f"{where}.options")


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"] and re.match(r"^[\w.\[\]-]+: ", msg):  # a whole-spec check that names its field
            lines.append(f"spec error: {msg}")
            continue
        if e["type"] == "extra_forbidden":
            msg = unknown_key(e["loc"][-1], _allowed(e["loc"]))
        elif e["type"] == "missing":
            parent = ".".join(str(p) for p in e["loc"][:-1])
            msg = f"required field is missing; add {e['loc'][-1]}: {f'under {parent}' if parent else 'to the spec'}"
        else:
            msg = explain(e, field_at(SweepSpec, e["loc"]))
            named = re.match(r"^([\w]+)((?:\.[\w]+)*): (.*)", msg)
            if named and named[1] in _allowed((*e["loc"], "_")):  # a model's check naming its own field
                where, msg = f"{where}.{named[1]}{named[2]}", named[3]
        lines.append(f"spec error: {where}: {msg}")
    return "\n".join(lines)



def _allowed(loc: tuple) -> list[str]:
    model: Any = SweepSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = getattr(ann, "__args__", (ann,))[0] if hasattr(ann, "__args__") else ann
    return [f.alias or name for name, f in getattr(model, "model_fields", {}).items()]


def _read_mapping(path: Path, what: str) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"error: {what} {str(path)!r} not found; check the path (a relative one is read "
                        f"from the current directory, {Path.cwd()})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        why = " ".join(str(getattr(err, "problem", None) or err).split())
        raise SpecError(f"error: {what} {str(path)!r} is not valid YAML: {at}{why}; fix the YAML there "
                        "(indentation, an unclosed bracket or quote, a missing ': ')") from None
    if not isinstance(raw, dict):
        raise SpecError(f"error: {what} {str(path)!r} must hold a mapping of fields; write it as "
                        "KEY: VALUE lines (e.g. max_steps: 50), not a list or a single value")
    return raw


def overlay(path: str | Path) -> list[tuple[str, Any]]:
    """An overlay file: a YAML mapping of `key.path: value` overrides, applied in order like
    --set (e.g. examples/toyworld_overlay.yaml retargets a library spec at the toy world).
    Relative paths in its values are resolved against the spec, as --set values are."""
    return list(_read_mapping(Path(path), "overlay file").items())


def load(path: str | Path, overrides: list[str | tuple[str, Any]] | None = None) -> SweepSpec:
    path = Path(path)
    return from_dict(_read_mapping(path, "spec file"), overrides or [], base_dir=path.parent)


def from_dict(raw: dict, overrides: list[str | tuple[str, Any]] | None = None,
              base_dir: Path | None = None) -> SweepSpec:
    raw = apply_overrides(raw, overrides or [])
    if base_dir is not None:
        _resolve_paths(raw, base_dir)
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_errors(err)) from None
