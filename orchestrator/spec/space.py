"""The attacker search space as data, and its expansion into trials."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    create_model,
)
from pydantic.fields import FieldInfo

from trainables.attacker import Strict
from trainables.config import Attacker
from trainables.messages import explain

DomainKind = Literal["constant", "grid", "choice", "uniform", "loguniform", "randint"]
SAMPLED = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Dim:
    """One attacker field's domain."""

    kind: DomainKind
    values: tuple[Any, ...]
    """The constant (one value), the options (grid/choice) or the bounds (low, high)."""

    def to_yaml(self) -> Any:
        return self.values[0] if self.kind == "constant" else {self.kind: list(self.values)}

    def values_or_range(self) -> Any:
        """Every value this domain can give (randint's high is exclusive)."""
        return range(int(self.values[0]), int(self.values[1])) if self.kind == "randint" else self.values

    def largest(self, default: Any = None) -> Any:
        """The largest value this domain can give; None values count as `default`."""
        return max(default if v is None else v for v in self.values_or_range())


def _dim_parser(name: str, info: FieldInfo):
    ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    scalar = TypeAdapter(ann, config=ConfigDict(allow_inf_nan=False))   # as Strict's: .nan, .inf refused

    def check(value: Any, where: str) -> Any:
        try:
            return scalar.validate_python(value)
        except ValidationError as err:
            raise ValueError(f"{where}{explain(err.errors()[0], info)}") from None

    def parse(raw: Any) -> Dim:
        if isinstance(raw, Dim):
            return raw
        if not isinstance(raw, dict):
            return Dim("constant", (check(raw, ""),))
        kinds = ", ".join(k for k in DomainKind.__args__ if k != "constant")
        if len(raw) != 1 or next(iter(raw)) not in DomainKind.__args__[1:]:
            fix = "keep one KIND" if len(raw) > 1 else \
                f"replace {next(iter(raw))!r} with one of them" if raw else "name one KIND"
            raise ValueError(f"expected a constant or a one-key mapping {{KIND: ...}} with KIND "
                             f"one of: {kinds} (got {raw!r}); {fix}")
        kind, args = next(iter(raw.items()))
        if not isinstance(args, list) or not args:
            raise ValueError(f"{kind}: expected a non-empty list (got {args!r}); list the values, "
                             f"e.g. {{{kind}: [A, B]}}")
        values = tuple(check(v, f"{kind}[{i}]: ") for i, v in enumerate(args))
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not values[0] < values[1]:
                fix = "swap them" if len(values) == 2 and values[0] > values[1] else \
                    "give two bounds, the lower first (a constant for one value)"
                raise ValueError(f"{kind}: expected [low, high] with low < high (got {args!r}); {fix}")
            if not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{kind} needs numbers (got {args!r}); use {{choice: [...]}} for other values")
        return Dim(kind, values)

    return parse


def _space_model() -> type[BaseModel]:
    fields = {
        name: (Annotated[Dim, PlainValidator(_dim_parser(name, info)),
                         PlainSerializer(Dim.to_yaml)],
               Dim("constant", (info.default,)))
        for name, info in Attacker.model_fields.items()
    }
    return create_model("AttackerSpace", __config__=Strict.model_config,
                        __doc__="Each trainables.Attacker field as a domain.", **fields)


AttackerSpace = _space_model()


def _sample(dim: Dim, rng: random.Random) -> Any:
    lo, hi = (dim.values + (None,))[:2]
    if dim.kind == "choice":
        return rng.choice(dim.values)
    if dim.kind == "uniform":
        return rng.uniform(lo, hi)
    if dim.kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dim.kind == "randint":
        return rng.randrange(int(lo), int(hi))
    raise AssertionError(dim.kind)


def attackers(space: BaseModel, algorithm: Literal["grid", "random"], num_samples: int,
              seed: int) -> list[dict[str, Any]]:
    """The attacker configs a grid/random sweep runs, in a fixed order.

    grid: the cross product of every grid and choice dimension (no sampled ones allowed).
    random: the cross product of the grid dimensions, each paired with num_samples draws
    of the sampled dimensions (seeded, so a rerun draws the same attackers).
    Every defence faces the same list, so defences are compared on the same attackers."""
    dims: dict[str, Dim] = dict(space)
    crossed = [n for n, d in dims.items() if d.kind == "grid" or
               (algorithm == "grid" and d.kind == "choice")]
    sampled = [n for n, d in dims.items() if d.kind in SAMPLED and n not in crossed]
    rng = random.Random(seed)
    draws = [{n: _sample(dims[n], rng) for n in sampled}
             for _ in range(num_samples if algorithm == "random" else 1)]
    out = []
    for combo in itertools.product(*(dims[n].values for n in crossed)):
        for draw in draws:
            cfg = {n: d.values[0] for n, d in dims.items() if d.kind == "constant"}
            cfg.update(zip(crossed, combo, strict=True))
            cfg.update(draw)
            out.append(as_json({n: cfg[n] for n in dims}))  # field order, for stable display
    return out


LATER_FIELDS = ("attack_domain",)
"""Attacker fields added after attackers were first recorded: left out of an attacker while
null, so the ids and keys of attackers recorded before them stay the same."""


def as_json(attacker: dict[str, Any]) -> dict[str, Any]:
    """An attacker config as plain JSON values (stages as dicts), the form trials carry."""
    dump = Attacker.model_validate(attacker).model_dump(mode="json")
    return {k: v for k, v in dump.items() if not (k in LATER_FIELDS and v is None)}


def searched(space: BaseModel) -> dict[str, Dim]:
    """The dimensions an adaptive searcher explores (grid counts as a choice there)."""
    return {n: d for n, d in dict(space).items() if d.kind != "constant"}


def decode(space: BaseModel, config: dict[str, Any]) -> dict[str, Any]:
    """A searcher's config -> an attacker. Categorical dimensions travel as indices, so any
    value (a list of target modules, a list of stages) can be searched by TPE/HyperOpt."""
    out = {}
    for n, d in dict(space).items():
        if d.kind == "constant":
            out[n] = d.values[0]
        elif d.kind in ("grid", "choice"):
            out[n] = d.values[int(config[n])]
        elif d.kind == "randint":
            out[n] = int(config[n])
        else:
            out[n] = float(config[n])
    return as_json(out)


def encode(space: BaseModel, attacker: dict[str, Any]) -> dict[str, Any] | None:
    """An attacker -> the searcher's config (None when it lies outside this space)."""
    out: dict[str, Any] = {}
    for n, d in searched(space).items():
        value = attacker.get(n)
        if d.kind in ("grid", "choice"):
            options = [json.dumps(as_json({n: v})[n], sort_keys=True) for v in d.values]
            key = json.dumps(value, sort_keys=True)
            if key not in options:
                return None
            out[n] = options.index(key)
        else:
            lo, hi = d.values
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                return None
            out[n] = value
    return out


def max_horizon(space: BaseModel, max_steps: int) -> int:
    """The longest training length T an attacker of this space can have (for the penalty)."""
    dims: dict[str, Dim] = dict(space)
    longest = int(dims["steps"].largest(default=max_steps))
    stage_sums = [sum(int(_get(s, "steps")) for s in v) for v in dims["stages"].values if v]
    if stage_sums and all(dims["stages"].values):  # every attacker is staged: steps is unused
        return max(stage_sums)
    return max([longest, *stage_sums])


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def attacker_id(attacker: dict[str, Any]) -> str:
    """Short stable id of an attacker config: pairs trials across defences."""
    return digest(attacker)[:10]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
