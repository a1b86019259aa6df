"""The sweep spec as typed models: defences, search, resources and the SweepSpec that holds them,
validated before anything starts."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.conditions.config import Conditions
from orchestrator.spec.space import SAMPLED, AttackerSpace, attackers
from trainables.attacker import Attacker
from trainables.attacker import Strict as _Strict
from trainables.conditioning import Conditioning
from trainables.config import Checkpoint, DataSource, DeepSpeed, Evaluation, EvaluatorConfig
from trainables.defences.config import Build
from trainables.messages import explain, field_at
from trainables.names import Unit


class SpecError(ValueError):
    """A spec problem, already phrased for the user (one line per problem)."""


# letters, digits, '_', '.', '-', not starting with '.': names become folder and file names
NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""Where the records go without --tracking-uri (here, not in orchestrator/tracking/, so that
the CLI can name it in --help without importing MLflow)."""


def safe_name(text: str) -> str:
    """Any string (an MLflow experiment name) as a name NAME accepts, for file and folder names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".") or "_"


class Defence(Checkpoint):
    """A checkpoint to attack, named for the report: ready (`model`), or built by the sweep (`build`)."""

    name: str = Field(pattern=NAME)
    """Short name: letters, digits, '_', '.', '-'."""
    model: str | None = None
    """Local directory or hub id of a causal LM. With `build`: the folder the build is written to
    (default: the build cache, $ATTACK_SWEEP_CACHE/defences/<method>-<key>)."""
    build: Build | None = None
    """Build this defence before attacking it (trainables/defences/, docs/defences.md): a method
    (repnoise, vaccine, booster, tar, deep) trains the checkpoint `from` names on the defender's
    data; cached by content, recorded in MLflow (a run of kind build)."""
    base: bool = False
    """True for the undefended base model the defences are compared against (exactly one)."""
    immunised_on: list[str] | None = None
    """The harm domains the defender trained on (values of data.attack.domain_field): the
    generalisation condition splits this defence's budgets-to-failure into attacks from these
    domains (in-domain) and from the others (out-of-domain). null: not declared."""

    paper_attacker: Attacker | None = None
    """The attacker this defence's paper evaluated it against, scaled to this world (its learning
    rate, its steps relative to the data, its data size): run once beside the adversary's search
    (a run of kind paper) and shown beside the adaptive worst case in the report's durability
    table. Attacker fields as constants (space's names); null: none."""

    defender_data: DataSource | None = None
    """The harmful data the defender trained on, when known: preflight checks that the attack and
    eval splits share no prompt with it, naming those that do (evaluation hygiene)."""

    @model_validator(mode="before")
    @classmethod
    def _immunised_where_built(cls, raw: Any) -> Any:
        """A defence built on some harm domains (build.domains) is immunised on them unless it says."""
        if isinstance(raw, dict) and isinstance(raw.get("build"), dict) and raw["build"].get("domains") \
                and "immunised_on" not in raw:
            return {**raw, "immunised_on": list(raw["build"]["domains"])}
        return raw

    @model_validator(mode="after")
    def _model_or_build(self) -> Defence:
        if self.build is None and self.model is None:
            raise ValueError("model: give the checkpoint to attack (model: PATH or hub id), or a build: block "
                             "that makes it")
        if self.build is not None:
            for field in ("adapter", "tokenizer", "revision"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field}: a built defence is a plain checkpoint folder (adapters merged, its "
                                     f"tokenizer inside); drop {field}, or set it on the defence build.from names")
        return self

    def checkpoint(self) -> dict[str, Any]:
        """The Checkpoint fields alone: what a trial loads."""
        if self.model is None:
            raise RuntimeError(f"defence {self.name} is built by the sweep and has not been built yet "
                               "(orchestrator/sweep/defend.build_all)")
        return self.model_dump(include=set(Checkpoint.model_fields))

    @property
    def unbuilt(self) -> bool:
        """Built by the sweep, and not found or built yet in this process (no folder on disk)."""
        from trainables.defences.build import manifest_of

        return self.build is not None and (self.model is None or manifest_of(Path(self.model)) is None)


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
    pending_timeout: float | None = Field(None, ge=0)
    """Seconds a sweep waits with trials pending for resources and none running before it ends with
    an error naming what they wait for (its records closed; a rerun resumes). null: 300 on the local
    Ray a sweep starts itself, no limit on a cluster it joins (--address: an autoscaler may be adding
    nodes); 0: wait for ever; a number applies everywhere."""


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
    def _builds_start_somewhere(self) -> SweepSpec:
        """A build's `from` naming defences that start from each other is a cycle (issue 29)."""
        built = {d.name: d.build.from_ for d in self.defences if d.build is not None}
        for i, d in enumerate(self.defences):
            chain, name = [d.name], d.name
            while name in built and built[name] in {x.name for x in self.defences}:
                name = built[name]
                if name in chain:
                    path = " -> ".join([*chain[chain.index(name):], name])
                    raise ValueError(f"defences.{i}.build.from: {path} is a cycle; start one of them from a "
                                     "checkpoint (a folder or hub id)")
                chain.append(name)
        return self

    def release_source(self, d: Defence) -> Defence:
        """The checkpoint that stands for `d` before the sweep builds it (its start, followed through
        the defences it starts from), for the checks that need a tokenizer or a config: a build keeps
        both. `d` itself when it is ready or built."""
        if not d.unbuilt:
            return d
        by_name = {x.name: x for x in self.defences}
        if d.build.from_ in by_name:
            return self.release_source(by_name[d.build.from_])
        return d.model_copy(update={"model": d.build.from_, "build": None})

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
                if not field and (named := re.match(r"(\w+): (.*)", msg)) and named[1] in model.model_fields:
                    field, msg = named[1], named[2]   # a check across options, naming the one it is about
                raise ValueError(f"{where}.options{'.' if field else ''}{field}: {msg}") from None
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




def unknown_key(key: Any, allowed: list[str], what: str = "key") -> str:
    """An unknown key, with the allowed ones and the likeliest meant (a misspelling, mostly)."""
    near = difflib.get_close_matches(str(key), allowed, n=1)
    meant = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown {what} (check its spelling; {meant}allowed {what}s: {', '.join(allowed) or '?'})"

