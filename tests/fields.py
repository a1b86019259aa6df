"""Whether a spec field path a message names exists in the spec's models.

    from fields import missing
    assert missing("data.prompt_format") is None
    assert missing("data.prompt_template") == "prompt_template"

A path walks SweepSpec's fields: list items by index (`defences.1.model`, `evaluators[judge]`),
an evaluator's `options.NAME` against every evaluator's option fields. `{}` (a part filled in
at run time) matches anything from there on.
"""

from __future__ import annotations

import re
from typing import Any, get_args, get_origin

from pydantic import BaseModel


def _options() -> set[str]:
    from trainables.evaluators import base

    return {name for _, opts in base._REGISTRY.values() for name in opts.model_fields}


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return next((m for a in get_args(ann) if (m := _model_in(a)) is not None), None)


def _is_list(ann: Any) -> bool:
    return get_origin(ann) is list or any(_is_list(a) for a in get_args(ann))


def missing(path: str) -> str | None:
    """The first part of `path` that names no field (None when every part does)."""
    from orchestrator.spec.model import SweepSpec

    model: Any = SweepSpec
    parts = [p for p in re.split(r"\.|(?=\[)", path) if p]
    listed = False
    for part in parts:
        if listed and (part.isdigit() or part.startswith("[") or part == "{}"):
            listed = False
            continue
        if "{}" in part:
            return None
        if model == "options":
            return None if part in _options() else part
        names = {info.alias or name: name for name, info in model.model_fields.items()} if model is not None else {}
        if part not in names:   # a field is named as a spec writes it (its alias: build.from)
            return part
        ann = model.model_fields[names[part]].annotation
        listed = _is_list(ann)
        model = "options" if part == "options" else _model_in(ann)
    return None
