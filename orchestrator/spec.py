"""The sweep spec: a YAML file, validated into typed models before anything starts.

    attack-sweep validate search_spaces/quickstart.yaml

Errors come out one per line, each naming the field and what it accepts:

    spec error: space.finetune: choice[1]: Input should be 'lora' or 'full' (got 'qlora')
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.conditions.config import Conditions
from orchestrator.space import SAMPLED, AttackerSpace, attackers
from trainables.conditioning import Conditioning
from trainables.config import Checkpoint, DataSource, DeepSpeed, Evaluation, EvaluatorConfig, explain, field_at
from trainables.names import Unit


class SpecError(ValueError):
    """A spec problem, already phrased for the user (one line per problem)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# letters, digits, '_', '.', '-', not starting with '.': names become folder and file names
NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""Where the records go without --tracking-uri (here, not in orchestrator/tracking.py, so that
the CLI can name it in --help without importing MLflow)."""


def safe_name(text: str) -> str:
    """Any string (an MLflow experiment name) as a name NAME accepts, for file and folder names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".") or "_"


class Defence(Checkpoint):
    """A checkpoint to attack, named for the report."""

    name: str = Field(pattern=NAME)
    """Short name: letters, digits, '_', '.', '-'."""
    base: bool = False
    """True for the undefended base model the defences are compared against (exactly one)."""
    immunised_on: list[str] | None = None
    """The harm domains the defender trained on (values of data.attack.domain_field): the
    generalisation condition splits this defence's budgets-to-failure into attacks from these
    domains (in-domain) and from the others (out-of-domain). null: not declared."""

    defender_data: DataSource | None = None
    """The harmful data the defender trained on, when known: preflight checks that the attack and
    eval splits share no prompt with it, naming those that do (evaluation hygiene)."""

    def checkpoint(self) -> dict[str, Any]:
        """The Checkpoint fields alone: what a trial loads."""
        return self.model_dump(include=set(Checkpoint.model_fields))


Algorithm = Literal["grid", "random", "tpe", "hyperopt"]
ADAPTIVE: tuple[Algorithm, ...] = ("tpe", "hyperopt")


class Search(_Strict):
    """How the adversary picks attackers. Every defence gets its own search."""

    algorithm: Algorithm = "grid"
    """grid: cross every grid/choice dimension; random: draw num_samples attackers;
    tpe (Optuna TPE) / hyperopt (HyperOpt TPE): model-based adversaries that pick each next
    attacker from the results so far, minimising budget-to-failure in `unit`."""
    num_samples: int = Field(1, gt=0)
    """random: attackers drawn per combination of grid dimensions (grid: must be 1);
    tpe/hyperopt: trials per defence."""
    n_initial: int = Field(5, ge=1)
    """tpe/hyperopt: random trials before the model starts to steer."""
    unit: Unit = "steps"
    """The budget unit the adversary minimises and max_compute counts in."""
    penalty: float = Field(2.0, ge=1)
    """An attack that resisted (censored at T), diverged or was degenerate enters the objective as
    penalty x the budget of a full-length run: penalty x T_max x (its budget per step)."""
    max_compute: float | None = Field(None, gt=0)
    """Cap on the attacker compute spent per defence, in `unit` (all trials summed); the
    search starts no new trial once it is spent (trials in flight finish)."""
    max_concurrent: int | None = Field(None, gt=0)
    """Trials run at once (default: as many as the resources allow)."""
    seed: int = 0
    """Seeds the draw of attackers and the adaptive searchers, so a rerun draws the same."""
    prune: bool = False
    """Stop a running trial once the budget it has spent, still safe, reaches the cheapest success
    already found against its defence (in `unit`): it can no longer lower the worst case. Its
    status is `pruned`, censored where it stopped. The worst case in `unit` is unchanged; medians,
    survival beyond that budget and worst cases in other units become bounds. Compute spent before
    the first success against a defence is never pruned. A later run without it reruns the pruned
    trials of a grid/random search."""


class Resources(_Strict):
    """What each trial reserves from Ray."""

    cpu: float = Field(1.0, gt=0)
    """CPUs per trial, or per worker when workers > 1 (fractions allowed)."""
    gpu: float = Field(0.0, ge=0)
    """GPUs per trial, or per worker when workers > 1 (fractions allowed)."""
    workers: int = Field(1, ge=1)
    """Ray Train workers per trial: > 1 runs each trial as a TorchTrainer whose workers train
    data-parallel under DeepSpeed (deepspeed.config, ZeRO stage 0 by default), one GPU each
    where gpu > 0, else CPU processes (gloo)."""


class SweepSpec(Evaluation):
    """One sweep: every defence against every attacker of the space. How trials are scored
    and when they stop (data, evaluators, utility, phi, eval schedule, refine, max_steps,
    device) is trainables.config.Evaluation, shared with every trial's AttackConfig."""

    name: str = Field(pattern=NAME)
    """Sweep name; also the MLflow experiment name."""
    defences: list[Defence] = Field(min_length=1)
    """The checkpoints to attack: exactly one marked `base: true` (the undefended model the others
    are compared against), each with a unique name."""
    search: Search = Search()
    """How the adversary picks attackers (grid, random, tpe, hyperopt), the unit it minimises and
    its compute cap."""
    space: AttackerSpace = AttackerSpace()
    """The attackers: every attacker field as a constant or a domain (grid, choice, uniform,
    loguniform, randint). Every defence faces the same attackers."""
    resources: Resources = Resources()
    """CPUs, GPUs and Ray Train workers per trial."""
    deepspeed: DeepSpeed | None = None
    """Train under DeepSpeed: {config: clusters/deepspeed/zero2.json (a path, relative to the
    spec, or a mapping), gradient_accumulation_steps, precision}. Also with one worker."""
    conditions: Conditions | None = None
    """The immunisation conditions measured beside resistance: stability, trainability,
    generalisation (orchestrator/conditions); null: resistance only."""
    conditioning: Conditioning | None = None
    """The condition-number diagnostic of every defence at release (trainables/conditioning.py): κ of
    the harmful task's (data.attack) and the benign task's (utility.data, else data.benign) Hessian in
    a linear head on the frozen features, and RIR against the base. Measured by `attack-sweep
    diagnose` and after the attacks by `run`; null: not measured."""

    @field_validator("defences")
    @classmethod
    def _one_base_unique_names(cls, defences: list[Defence]) -> list[Defence]:
        names = [d.name for d in defences]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"defence names must be unique; repeated: {', '.join(dup)}; give each defence "
                             "its own name")
        bases = [d.name for d in defences if d.base]
        if len(bases) != 1:
            raise ValueError(f"mark exactly one defence with 'base: true' (the undefended model);"
                             f" found {len(bases)}")
        return defences

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _read_deepspeed_config(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("config"), str):
            path = Path(value["config"]).expanduser()
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise ValueError(f"config: no such file {str(path)!r}") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"config: {str(path)!r} is not valid JSON ({err})") from None
            return {**value, "config": config}
        return value

    @model_validator(mode="after")
    def _known_evaluators(self) -> SweepSpec:
        # here, not at the top: the evaluators' registry imports torch, and a spec error found
        # before this check (a field's) should not wait for it
        from trainables import evaluators

        for where, ev in evaluator_places(self):
            try:
                evaluators.validate_options(ev.name, ev.options)
            except ValidationError as err:
                first, model = err.errors()[0], evaluators.options_type(ev.name)
                field = ".".join(str(p) for p in first["loc"])
                msg = unknown_key(first["loc"][-1], list(model.model_fields), "option") \
                    if first["type"] == "extra_forbidden" else explain(first, field_at(model, first["loc"]))
                raise ValueError(f"{where}.options.{field}: {msg}") from None
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        return self

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepSpec:
        if self.search.algorithm == "grid":
            sampled = [n for n, d in dict(self.space).items()
                       if d.kind in SAMPLED and d.kind != "choice"]
            if sampled:
                raise ValueError(f"space.{sampled[0]}: search.algorithm=grid cannot sample space.{sampled[0]} "
                                 f"({dict(self.space)[sampled[0]].kind}); use grid/choice "
                                 "values or search.algorithm=random")
            if self.search.num_samples != 1:
                raise ValueError("search.num_samples: must be 1 with search.algorithm=grid; set num_samples: 1 "
                                 "and add a seed dimension (space.seed: {grid: [0, 1]}) to repeat attackers")
        if self.g_effect is not None and self.distributed is not None:
            raise ValueError("g_effect: the probe takes whole gradients in one process, which DeepSpeed / "
                             "multi-worker trials do not have; set g_effect: null or resources.workers: 1 "
                             "without deepspeed")
        if self.refine and self.distributed is not None:
            raise ValueError("refine: refine needs snapshots of the training state, which DeepSpeed / "
                             "multi-worker trials do not take; set refine: 0")
        if self.search.algorithm in ADAPTIVE and not any(
                d.kind != "constant" for d in dict(self.space).values()):
            raise ValueError(f"search.algorithm: {self.search.algorithm} needs at least one non-constant space "
                             "dimension to search; give one a domain, e.g. space.learning_rate: {loguniform: "
                             "[1.0e-5, 1.0e-3]}")
        return self

    @model_validator(mode="after")
    def _conditions_have_data(self) -> SweepSpec:
        """A condition asked for without what it needs: one line naming the field to add."""
        c = self.conditions or Conditions()
        if c.stability and self.utility is None and c.stability.lm_eval is None:
            raise ValueError("conditions.stability: needs a capability score at release: a utility block "
                             "(utility: {data: {source: BENIGN_HELDOUT}}) or lm-eval tasks (conditions.stability."
                             "lm_eval: {tasks: [...]})")
        attack_domain = dict(self.space)["attack_domain"]
        if attack_domain.values != (None,) and not self.data.attack.domain_field:
            raise ValueError("space.attack_domain: attackers train on one harm domain, but data.attack.domain_field "
                             "is not set (the field naming each row's domain, e.g. category)")
        declared = [d.name for d in self.defences if d.immunised_on]
        if declared and not self.data.attack.domain_field:
            raise ValueError(f"defences: {declared[0]} declares immunised_on, but data.attack.domain_field is not "
                             "set (the field naming each row's harm domain, e.g. category)")
        if c.generalisation:
            for split in ("attack", "eval"):
                if not getattr(self.data, split).domain_field:
                    raise ValueError(f"conditions.generalisation: data.{split}.domain_field is not set; name the "
                                     "field that holds each row's harm domain (e.g. domain_field: category)")
            if dict(self.space)["attack_domain"].kind == "constant":
                raise ValueError("conditions.generalisation: attackers must attack domain by domain; add a "
                                 "space dimension space.attack_domain: {grid: [DOMAIN, ...]}")
            if not [d for d in declared if not next(x for x in self.defences if x.name == d).base]:
                raise ValueError("conditions.generalisation: no defence declares immunised_on (the harm domains "
                                 "its defender trained on); add immunised_on: [DOMAIN, ...] to a defence")
        return self

    @model_validator(mode="after")
    def _conditioning_has_tasks(self) -> SweepSpec:
        if self.conditioning is None:
            return self
        if self.benign_answers is None:
            raise ValueError("conditioning: the benign task needs benign prompts with answers: set utility.data "
                             "or data.benign (with a response_field)")
        if self.data.attack.response_field is None:
            raise ValueError("conditioning: the harmful task needs data.attack.response_field (the responses "
                             "the head's features are read at)")
        return self

    @property
    def distributed(self) -> DeepSpeed | None:
        """The DeepSpeed settings trials train under (workers > 1 implies ZeRO stage 0)."""
        return self.deepspeed or (DeepSpeed() if self.resources.workers > 1 else None)

    @property
    def adaptive(self) -> bool:
        return self.search.algorithm in ADAPTIVE

    def attackers(self) -> list[dict[str, Any]]:
        """The attackers of a grid/random search, the same for every defence (JSON-ready)."""
        s = self.search
        if self.adaptive:
            raise ValueError("an adaptive search picks its attackers while it runs")
        return attackers(self.space, s.algorithm, s.num_samples, s.seed)

    @property
    def base(self) -> Defence:
        return next(d for d in self.defences if d.base)


def evaluator_places(spec: Evaluation) -> list[tuple[str, EvaluatorConfig]]:
    """Each evaluator with how an error names it: `evaluator`, or by label when listed."""
    if not spec.evaluators:
        return [("evaluator", spec.evaluator)]
    return [(f"evaluators[{e.key}]", e) for e in spec.all_evaluators]


# --- loading ---------------------------------------------------------------------------


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
    else stays as given (a hub id)."""

    def fix(d: dict, key: str, where: str) -> None:
        value = d.get(key)
        if isinstance(value, str) and "${" in value:
            value = d[key] = _expand_env(value, f"{where}.{key}")
        if isinstance(value, str) and value.startswith(TOYWORLD):
            from orchestrator import toyworld

            try:
                d[key] = str(toyworld.build() / value.removeprefix(TOYWORLD))
            except OSError as err:
                raise SpecError(f"spec error: {where}.{key}: cannot build the toy world under "
                                f"{toyworld.cache_dir()} ({err.strerror or err}: {err.filename}); set "
                                "ATTACK_SWEEP_CACHE to a writable folder") from None
        elif isinstance(value, str) and not Path(value).is_absolute():
            found = next((c for c in (base_dir / value, Path(value)) if c.exists()), None)
            if found is not None:
                d[key] = str(found.resolve())

    for i, d in enumerate(raw.get("defences") or []):
        if isinstance(d, dict):
            for key in ("model", "adapter", "tokenizer"):
                fix(d, key, f"defences.{i}")
            if isinstance(d.get("defender_data"), dict):
                fix(d["defender_data"], "source", f"defences.{i}.defender_data")
    if isinstance(raw.get("deepspeed"), dict) and isinstance(raw["deepspeed"].get("config"), str):
        fix(raw["deepspeed"], "config", "deepspeed")
        path = Path(raw["deepspeed"]["config"]).expanduser()
        if not path.is_absolute():
            raw["deepspeed"]["config"] = str((base_dir / path).resolve())
    data = raw.get("data") or {}
    for split in ("attack", "eval", "benign"):
        if isinstance(data.get(split), dict):
            fix(data[split], "source", f"data.{split}")
    utility = raw.get("utility")
    if isinstance(utility, dict) and isinstance(utility.get("data"), dict):
        fix(utility["data"], "source", "utility.data")
    conditions = raw.get("conditions")
    if isinstance(conditions, dict):
        trainability = conditions.get("trainability")
        for split in ("data", "eval"):
            if isinstance(trainability, dict) and isinstance(trainability.get(split), dict):
                fix(trainability[split], "source", f"conditions.trainability.{split}")
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
        lines.append(f"spec error: {where}: {msg}")
    return "\n".join(lines)


def unknown_key(key: Any, allowed: list[str], what: str = "key") -> str:
    """An unknown key, with the allowed ones and the likeliest meant (a misspelling, mostly)."""
    near = difflib.get_close_matches(str(key), allowed, n=1)
    meant = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown {what} (check its spelling; {meant}allowed {what}s: {', '.join(allowed) or '?'})"


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
    return list(getattr(model, "model_fields", {}))


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
