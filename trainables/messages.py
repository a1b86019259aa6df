"""How a config error reads: the field a pydantic error points at, and one line saying what it
accepts."""

from __future__ import annotations

import math
import re
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_BOUND = {"gt": "above {}", "ge": "of at least {}", "lt": "below {}", "le": "of at most {}"}
_BOUND_KINDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def field_at(model: Any, loc: tuple) -> FieldInfo | None:
    """The field a pydantic error's location points at, through nested models and lists; None
    where the path leaves the models (a mapping's key, a union member)."""
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not isinstance(fields, dict) or part not in fields:
            return None
        info = fields[part]
        model = _model_in(info.annotation)
    return info


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return next((m for a in get_args(ann) if (m := _model_in(a)) is not None), None)


def explain(error: dict, field: FieldInfo | None = None) -> str:
    """A pydantic error as one clause the user can act on: pydantic's words, the value given and
    what to write instead (the range or the characters allowed). pydantic says what is wrong but,
    for a bound, not the other bound, and for a pattern, only the regex."""
    msg = error["msg"].removeprefix("Value error, ")
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in ("value_error", "assertion_error", "missing") or "(got " in msg:
        return msg  # our own validators phrase their messages for the user already
    bounds = {k: getattr(m, k) for m in (field.metadata if field else []) for k in _BOUND
              if getattr(m, k, None) is not None} | {k: v for k, v in ctx.items() if k in _BOUND}
    if kind == "finite_number" or (kind in _BOUND_KINDS and _not_finite(value)):
        # pydantic's words would be "should be a finite number", or for nan a bound it does not break
        word = _not_finite(value) or str(value)
        return (f"{word} is {'not a number' if word == 'nan' else 'not a finite number'}; use "
                + (f"a value {_within(bounds)}" if bounds else "a finite number"))
    if isinstance(value, (str, int, float, bool)) or value is None:
        msg += f" (got {value!r:.80})"
    if kind in _BOUND_KINDS:
        return f"{msg}; use a value {_within(bounds)}"
    if kind == "string_pattern_mismatch":
        return f"{msg}; {_pattern_hint(str(ctx.get('pattern', '')))}"
    if kind in ("too_short", "string_too_short") and "min_length" in ctx:
        return f"{msg}; give at least {ctx['min_length']}"
    if kind in ("too_long", "string_too_long") and "max_length" in ctx:
        return f"{msg}; give at most {ctx['max_length']}"
    return msg


def _not_finite(value: Any) -> str | None:
    """'nan', 'inf' or '-inf' for a value that reads as one (YAML's .nan, the string 'inf'), else None."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else 0.0
    except (ValueError, OverflowError):
        return None
    return None if math.isfinite(number) else "nan" if math.isnan(number) else "inf" if number > 0 else "-inf"


def _within(bounds: dict) -> str:
    shown = {k: f"{v:g}" if isinstance(v, (int, float)) else str(v) for k, v in bounds.items()}
    if "ge" in shown and "le" in shown:
        return f"between {shown['ge']} and {shown['le']}"
    return " and ".join(_BOUND[k].format(shown[k]) for k in _BOUND if k in shown)


def _pattern_hint(pattern: str) -> str:
    """A names pattern (`^[first][rest]*$` or `^[chars]+$`) in words; any other: match it."""
    m = re.fullmatch(r"\^(?:\[([^\]]+)\])?\[([^\]]+)\][*+]\$", pattern)
    if m is None:
        return "change it to match"
    first, rest = (_chars(c) if c else None for c in m.groups())
    hint = f"use only {', '.join(rest)}"
    if first is not None and (never := [c for c in rest if c not in first]):
        hint += f", not starting with {' or '.join(never)}"
    return hint


def _chars(cls: str) -> list[str]:
    words = {"A-Z": "letters", "a-z": "letters", "0-9": "digits"}
    out: list[str] = []
    for part in re.findall(r".-.|.", cls):  # ranges first; a '-' at either end is itself
        word = words.get(part, repr(part))
        if word not in out:
            out.append(word)
    return out
