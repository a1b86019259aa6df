"""Checks run in the driver before Ray starts, so bad data or paths fail in one line
instead of as an error inside every trial."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import SpecError, SweepSpec
from trainables import data as D


def _missing_local_path(value: str | None) -> bool:
    """A value written as a path (not a hub id) that does not exist."""
    return bool(value) and value.startswith(("/", "./", "../", "~")) and \
        not Path(value).expanduser().exists()


def check(spec: SweepSpec) -> None:
    for i, d in enumerate(spec.defences):
        for key in ("model", "adapter", "tokenizer"):
            if _missing_local_path(getattr(d, key)):
                raise SpecError(f"spec error: defences.{i}.{key}: no such path {getattr(d, key)!r}")
    counts = {}
    for split in ("attack", "eval"):
        src = getattr(spec.data, split)
        if _missing_local_path(src.source):
            raise SpecError(f"spec error: data.{split}.source: no such file {src.source!r}")
        try:
            counts[split] = len(D.load_rows(src))
        except ValueError as err:
            raise SpecError(f"spec error: data.{split}: {err}") from None
    biggest = max(a["dataset_size"] for a in spec.attackers())
    if biggest > counts["attack"]:
        raise SpecError(f"spec error: space.dataset_size: {biggest} exceeds the "
                        f"{counts['attack']} rows of data.attack; lower it")
    if spec.evaluator.name == "nll" and not spec.data.eval.response_field:
        raise SpecError("spec error: data.eval.response_field: the nll evaluator needs "
                        "reference responses")
