"""Checks run in the driver before Ray starts, so bad data, paths or a missing optional
package fail in one line instead of as an error inside every trial. Only local things are
checked: hub models and datasets are fetched by the trials themselves."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from orchestrator.spec import SpecError, SweepSpec, evaluator_places
from trainables import data as D
from trainables import evaluators
from trainables.optim import missing_dependency


def _missing_local_path(value: str | None) -> bool:
    """A value written as a path (not a hub id) that does not exist."""
    return bool(value) and value.startswith(("/", "./", "../", "~")) and \
        not Path(value).expanduser().exists()


def _stages(spec: SweepSpec) -> list[dict]:
    return [s for v in dict(spec.space)["stages"].values if v for s in v]


def check(spec: SweepSpec) -> list[str]:
    """Raise SpecError on the first problem; return notes on what could not be checked here."""
    notes = []
    for i, d in enumerate(spec.defences):
        for key in ("model", "adapter", "tokenizer"):
            if _missing_local_path(getattr(d, key)):
                raise SpecError(f"spec error: defences.{i}.{key}: no such path {getattr(d, key)!r}")
    space = dict(spec.space)
    stages = _stages(spec)
    for opt in {*space["optimizer"].values, *(s.optimizer for s in stages if s.optimizer)}:
        if msg := missing_dependency(opt):
            raise SpecError(f"spec error: space.optimizer: {msg}")
    if any(s.data == "benign" for s in stages) and spec.data.benign is None:
        raise SpecError("spec error: data.benign: a stage trains on benign data; "
                        "give data.benign: {source: ...}")
    wanted = {"attack": max([space["dataset_size"].largest(),
                             *(s.dataset_size or 0 for s in stages if s.data == "attack")]),
              "benign": max([0, *((s.dataset_size or space["dataset_size"].largest())
                                  for s in stages if s.data == "benign")]),
              "eval": 0}
    prompts: dict[str, list[str]] = {}
    for split, need in wanted.items():
        src = getattr(spec.data, split)
        if src is None:
            continue
        if _missing_local_path(src.source):
            raise SpecError(f"spec error: data.{split}.source: no such file {src.source!r}")
        if not Path(src.source).expanduser().exists():
            notes.append(f"data.{split}: {src.source!r} is not a local path; read as a hub "
                         "dataset when the trials start (not checked here)")
            continue
        try:
            loaded = D.load_rows(src)
        except ValueError as err:
            raise SpecError(f"spec error: data.{split}: {err}") from None
        prompts[split], rows = [str(r[src.prompt_field]) for r in loaded], len(loaded)
        if need > rows:
            raise SpecError(f"spec error: {'space.dataset_size' if split == 'attack' else 'space.stages'}"
                            f": {need} exceeds the {rows} rows of data.{split}; lower it")
    if shared := D.shared_prompts(prompts.get("eval", []), prompts.get("attack", [])):
        raise SpecError(f"spec error: data.eval: {len(shared)} held-out prompt(s) also in data.attack "
                        f"(first: {shared[0][:80]!r}); evaluate on prompts the attacker never trains on")
    notes += _check_utility(spec, prompts)
    for where, ev in evaluator_places(spec):
        try:
            evaluators.preflight(ev.name, ev.options)
        except ValueError as err:
            raise SpecError(f"spec error: {where}: {err}") from None
    if ds := spec.distributed:
        split = spec.resources.workers * ds.gradient_accumulation_steps
        if bad := sorted({int(b) for b in space["batch_size"].values_or_range() if int(b) % split}):
            raise SpecError(f"spec error: space.batch_size: {bad[0]} does not divide over "
                            f"{spec.resources.workers} workers x {ds.gradient_accumulation_steps} "
                            f"gradient-accumulation steps; use multiples of {split}")
    if not spec.adaptive:  # every trial's config, checked as the trial would
        from orchestrator.sweep import attack_config

        for attacker in spec.attackers():
            try:
                attack_config(spec, {"defence": spec.base.name, **attacker})
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "attacker"
                raise SpecError(f"spec error: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    if spec.evaluator.name == "nll" and not spec.data.eval.response_field:
        raise SpecError("spec error: data.eval.response_field: the nll evaluator needs "
                        "reference responses")
    return notes


def _check_utility(spec: SweepSpec, prompts: dict[str, list[str]]) -> list[str]:
    """The utility split: readable, with reference answers where the score needs them, and
    disjoint from every split an attacker trains on or f is scored on."""
    u = spec.utility
    if u is None:
        return ["no utility block: a crossing of phi counts as a successful attack even when the attack broke "
                "the model (gibberish, one memorised answer); add utility: {data: {source: BENIGN_HELDOUT}}"]
    src = u.data
    if _missing_local_path(src.source):
        raise SpecError(f"spec error: utility.data.source: no such file {src.source!r}")
    if not Path(src.source).expanduser().exists():
        return [f"utility.data: {src.source!r} is not a local path; read as a hub dataset when the trials "
                "start (not checked here)"]
    try:
        rows = D.load_rows(src)
    except ValueError as err:
        raise SpecError(f"spec error: utility.data: {err}") from None
    if u.score == "answer_probability" and (not src.response_field or any(r.get(src.response_field) is None
                                                                          for r in rows[: u.size])):
        raise SpecError("spec error: utility.data.response_field: score answer_probability needs a reference "
                        "answer in every row; give the field or use score: answered")
    mine = [str(r[src.prompt_field]) for r in rows[: u.size]]
    for split in ("attack", "eval", "benign"):
        if shared := D.shared_prompts(mine, prompts.get(split, [])):
            raise SpecError(f"spec error: utility.data: {len(shared)} prompt(s) also in data.{split} (first: "
                            f"{shared[0][:80]!r}); utility must be scored on held-out benign prompts")
    return []
