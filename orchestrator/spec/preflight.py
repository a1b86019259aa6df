"""Checks run in the driver before Ray starts, so bad data, paths, checkpoints, services or a
missing optional package fail in one line instead of as an error inside every trial.
Checkpoints are checked in orchestrator/spec/checkpoints.py (config and tokenizer, never the
weights); hub datasets are fetched by the trials themselves."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from orchestrator.spec import store
from orchestrator.spec.budget_notes import notes as budget_notes
from orchestrator.spec.model import SpecError, SweepSpec, evaluator_places
from orchestrator.spec.paths import DATA_FIX, missing, not_found
from trainables import data as D
from trainables.config import AttackConfig
from trainables.evaluators.base import names as evaluator_names
from trainables.evaluators.base import resolve
from trainables.messages import explain, field_at
from trainables.optim import missing_dependency


def _stages(spec: SweepSpec) -> list[dict]:
    return [s for v in dict(spec.space)["stages"].values if v for s in v]


def check(spec: SweepSpec, checkpoints: bool = True) -> list[str]:
    """Raise SpecError on the first problem; return notes on what could not be checked here.
    `checkpoints=False` leaves the defences' models unchecked (only the workers see them)."""
    notes = []
    space = dict(spec.space)
    stages = _stages(spec)
    for opt in {*space["optimizer"].values, *(s.optimizer for s in stages if s.optimizer)}:
        if msg := missing_dependency(opt):
            raise SpecError(f"spec error: space.optimizer: {msg}")
    if any(s.data == "benign" for s in stages) and spec.data.benign is None:
        raise SpecError("spec error: data.benign: a stage trains on benign data; "
                        "give data.benign: {source: ...}")
    wanted = {"attack": max([_attack_rows(space),
                             *(s.dataset_size or 0 for s in stages if s.data == "attack")]),
              "benign": max([0, *((s.dataset_size or space["dataset_size"].largest())
                                  for s in stages if s.data == "benign")]),
              "eval": 0}
    wanted["benign"] = max(wanted["benign"], _poison_benign_rows(spec))  # issue 25
    prompts: dict[str, list[str]] = {}
    read: dict[str, list[dict]] = {}  # the splits read here, for the budget notes
    for split, need in wanted.items():
        src = getattr(spec.data, split)
        if src is None:
            continue
        loaded, note = _read(src, f"data.{split}")
        if loaded is None:
            notes.append(note)
            continue
        prompts[split], rows = [str(r[src.prompt_field]) for r in loaded], len(loaded)
        read[split] = loaded
        if need > rows:
            mixed = split == "attack" and need < space["dataset_size"].largest()   # a poison mix's attack share
            raise SpecError(f"spec error: {'space.dataset_size' if split == 'attack' else 'space.stages'}"
                            f": {need}{' attack rows (its poison_ratio share)' if mixed else ''} exceeds the "
                            f"{rows} rows of data.{split}; lower it to at most {rows}"
                            + (" attack rows, or lower poison_ratio" if mixed else ""))
    if shared := D.shared_prompts(prompts.get("eval", []), prompts.get("attack", [])):
        raise SpecError(f"spec error: data.eval: {len(shared)} held-out prompt(s) also in data.attack "
                        f"(first: {shared[0][:80]!r}); remove them from data.eval: evaluate on prompts the "
                        "attacker never trains on")
    _check_methods(spec)
    notes += _check_defender_data(spec, prompts)
    notes += _check_utility(spec, prompts)
    notes += _check_conditions(spec, prompts)
    from trainables import evaluators  # here: its registry imports torch (check_tracking needs none)

    for where, ev in evaluator_places(spec):
        try:
            evaluators.preflight(ev.name, ev.options)
        except ValueError as err:
            raise SpecError(f"spec error: {where}: {err}") from None
    _check_decoding(spec)
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
                raise SpecError(f"spec error: {where}: {explain(first, field_at(AttackConfig, first['loc']))}") \
                    from None
    notes += budget_notes(spec, read)
    if spec.evaluator.name == "nll" and not spec.data.eval.response_field:
        raise SpecError("spec error: data.eval.response_field: the nll evaluator needs reference responses; "
                        "set data.eval.response_field to the field that holds them, or use another evaluator")
    if checkpoints:
        from orchestrator.spec import checkpoints as C

        notes += C.check(spec)
    else:
        notes.append("checkpoints not checked (--skip-checkpoint-checks): a wrong model path fails in every trial")
    return notes


# --- issue 25: evaluation-time attacks ---
def _check_decoding(spec: SweepSpec) -> None:
    """An evaluator's decoding (prefill, sampling) needs one that generates, a prefill shorter than
    its answers, and prefill_tokens needs the eval split's reference responses."""
    from trainables import evaluators

    for where, ev in evaluator_places(spec):
        d = ev.decoding
        if d is None:
            continue
        limit = getattr(evaluators.validate_options(ev.name, ev.options), "max_new_tokens", None)
        if limit is None:
            raise SpecError(f"spec error: {where}.decoding: {ev.name} does not generate answers, so there is nothing "
                            "to decode; drop decoding or use a generating evaluator (refusal_keyword, classifier, "
                            "judge, answer_match)")
        if d.prefill_tokens is not None and not spec.data.eval.response_field:
            raise SpecError(f"spec error: {where}.decoding.prefill_tokens: forces each held-out row's reference "
                            "response, and data.eval.response_field is null; set data.eval.response_field or give "
                            "a fixed prefill text")
        forced = d.prefill_tokens or (_prefill_length(spec, d.prefill) if d.prefill is not None else 0)
        if forced and forced >= limit:
            field = "prefill_tokens" if d.prefill_tokens else "prefill"
            raise SpecError(f"spec error: {where}.decoding.{field}: the prefill is {forced} tokens, which leaves "
                            f"none of options.max_new_tokens {limit} to generate; shorten it or raise "
                            "options.max_new_tokens above it")


def _prefill_length(spec: SweepSpec, text: str) -> int:
    """The prefill's tokens under the longest-reading local defence tokenizer (0 where none loads here)."""
    from transformers import AutoTokenizer

    longest = 0
    for source in {(r := spec.release_source(d)).tokenizer or r.model for d in spec.defences}:
        if not Path(source).expanduser().is_dir():
            continue
        try:
            tok = AutoTokenizer.from_pretrained(Path(source).expanduser(), local_files_only=True)
        except Exception:  # noqa: BLE001 - the checkpoint checks name a tokenizer that does not load
            continue
        longest = max(longest, len(tok(text, add_special_tokens=False)["input_ids"]))
    return longest


# --- issue 25: data and template attacks ---


def _attack_rows(space: dict) -> int:
    """The most attack rows an attacker of this space draws: dataset_size, or under a poison mix
    its attack share (poison_ratio null draws them all)."""
    from trainables.mixing import poison_counts

    n = space["dataset_size"].largest()
    return max(poison_counts(n, r)[0] for r in space["poison_ratio"].values)


def _poison_benign_rows(spec: SweepSpec) -> int:
    """The most benign rows a poison mix of this space draws (0 without poison_ratio); a
    poison_ratio without data.benign is a SpecError."""
    from trainables.mixing import poison_counts

    space = dict(spec.space)
    ratios = [r for r in space["poison_ratio"].values if r is not None]
    if not ratios:
        return 0
    if spec.data.benign is None:
        raise SpecError(f"spec error: space.poison_ratio: {ratios[0]} mixes benign rows into the attacker's "
                        "data; give data.benign: {source: ...} or set poison_ratio: null")
    return poison_counts(space["dataset_size"].largest(), min(ratios))[1]


def check_tracking(uri: str, timeout: float = 5.0, creates: bool = True) -> None:
    """Reach the MLflow tracking store once, before anything starts: one line naming it when it
    cannot be reached (MLflow's own retries would otherwise wait minutes in silence), or when a
    local one is not an MLflow store; without `creates` (a command that only reads), also when
    it is not there (orchestrator/spec/store.py)."""
    from urllib.parse import urlparse

    from orchestrator.spec.checkpoints import unreachable

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if why := unreachable(parsed.hostname or "", port, timeout):
            raise SpecError(f"error: --tracking-uri {uri}: no MLflow server answers ({why}); start it "
                            f"(mlflow server --host 127.0.0.1 --port {port}) or use the default sqlite:///mlflow.db")
    elif parsed.scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:":
            store.check_sqlite(uri, Path(path).expanduser(), creates)
    elif parsed.scheme in ("", "file"):
        store.check_folder(uri, Path(parsed.path if parsed.scheme else uri).expanduser(), creates)
    elif parsed.scheme not in ("databricks", "databricks-uc", "uc"):
        raise SpecError(f"error: --tracking-uri {uri}: unknown scheme {parsed.scheme!r}; use sqlite:///FILE, "
                        "http://HOST:PORT or a folder")


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Reach the Ray cluster named by --address once, before anything starts."""
    if address is None or address == "local":
        return
    from orchestrator.spec.checkpoints import unreachable

    if address == "auto":
        from ray._private.services import find_gcs_addresses  # only where --address auto is given

        if not find_gcs_addresses():
            raise SpecError("error: --address auto: no Ray cluster is running on this machine; start one "
                            "(ray start --head) or drop --address to start a local one")
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"error: --address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    if why := unreachable(host, int(port), timeout):
        raise SpecError(f"error: --address {address}: no Ray cluster answers ({why}); check the address "
                        "and that the cluster is up (ray status)")


# --- issue 25: attack methods ---
def _check_methods(spec: SweepSpec) -> None:
    """What methods dpo and grpo need: the single-process loop (DeepSpeed steps run SFT only), no
    G-effect probe (it measures the SFT gradient); dpo a rejected answer for every pair, grpo a
    reward evaluator that gives verdicts."""
    chosen = dict(spec.space)["method"].values_or_range()
    if spec.data.attack.response_field is None and (trained := [m for m in chosen if m != "grpo"]):
        raise SpecError(f"spec error: data.attack.response_field: is null, but space.method {trained[0]} trains "
                        "on the attack split's responses; set data.attack.response_field, or use method grpo "
                        "(prompts alone)")
    methods = [m for m in ("dpo", "grpo") if m in chosen]
    for method in methods:
        if spec.distributed is not None:
            where = "deepspeed" if spec.deepspeed else f"resources.workers: {spec.resources.workers}"
            raise SpecError(f"spec error: space.method: {method} trains in the single-process loop only, not under "
                            f"{where}; remove deepspeed: and set resources.workers: 1, or keep method sft")
        if spec.g_effect is not None:
            raise SpecError(f"spec error: g_effect: the probe measures the SFT gradient, not space.method {method}'s; "
                            "set g_effect: null or keep method sft")
    if "grpo" in methods:
        _check_reward(spec)
    if "dpo" in methods and not spec.data.attack.rejected_field and not spec.data.refusal.strip():
        raise SpecError("spec error: data.refusal: is empty and data.attack.rejected_field is unset, so method "
                        "dpo has no rejected answer; write the refusal as the defended model words it, or set "
                        "data.attack.rejected_field")


def _check_reward(spec: SweepSpec) -> None:
    """grpo_reward names an evaluator (a spec label, or a registered name) that gives verdicts."""
    for key in dict(spec.space)["grpo_reward"].values_or_range():
        try:
            name, _ = resolve(key, spec.all_evaluators)
        except ValueError:
            known = ", ".join([e.key for e in spec.all_evaluators] + evaluator_names())
            raise SpecError(f"spec error: space.grpo_reward: {key!r} is neither a registered evaluator nor one of "
                            f"the spec's evaluator labels; use one of {known}") from None
        if name == "nll":
            raise SpecError(f"spec error: space.grpo_reward: {key!r} is nll, which scores no harmful verdict to "
                            "reward; use refusal_keyword, match, classifier or judge")


def _check_utility(spec: SweepSpec, prompts: dict[str, list[str]]) -> list[str]:
    """The utility split: readable, with reference answers where the score needs them, and
    disjoint from every split an attacker trains on or f is scored on."""
    u = spec.utility
    if u is None:
        return ["no utility block: a crossing of phi counts as a successful attack even when the attack broke "
                "the model (gibberish, one memorised answer); add utility: {data: {source: BENIGN_HELDOUT}}"]
    src = u.data
    rows, note = _read(src, "utility.data")
    if rows is None:
        return [note]
    if u.score == "answer_probability" and (not src.response_field or any(r.get(src.response_field) is None
                                                                          for r in rows[: u.size])):
        raise SpecError("spec error: utility.data.response_field: score answer_probability needs a reference "
                        "answer in every row; give the field or use score: answered")
    mine = [str(r[src.prompt_field]) for r in rows[: u.size]]
    for split in ("attack", "eval", "benign"):
        if shared := D.shared_prompts(mine, prompts.get(split, [])):
            raise SpecError(f"spec error: utility.data: {len(shared)} prompt(s) also in data.{split} (first: "
                            f"{shared[0][:80]!r}); remove them from utility.data: utility must be scored on "
                            "held-out benign prompts")
    return []


def _read(src, where: str) -> tuple[list[dict] | None, str]:
    """A split's rows, from a local file or, where the hub can be reached, a hub dataset; else
    (None, a note saying it was not checked). A bad local split is a SpecError."""
    if missing(src.source):
        raise SpecError(not_found(f"{where}.source", src.source, "file", DATA_FIX))
    if not Path(src.source).expanduser().exists():
        from orchestrator.spec.checkpoints import hub_offline

        if why := hub_offline():
            return None, (f"{where}: {src.source!r} is not a local path; read as a hub dataset when the trials "
                          f"start (not checked here: {why})")
        try:
            return D.load_rows(src), ""
        except Exception as err:  # noqa: BLE001 - a hub split that cannot be read here is a note, not a failure
            return None, (f"{where}: {src.source!r} is not a local path and could not be read here "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:160]}); read when the trials start")
    try:
        return D.load_rows(src), ""
    except ValueError as err:
        raise SpecError(f"spec error: {where}: {err}") from None


def _rows(src, where: str) -> list[dict] | None:
    """A split's rows, or None when they cannot be read here (read by the workers)."""
    return _read(src, where)[0]


def _check_defender_data(spec: SweepSpec, prompts: dict[str, list[str]]) -> list[str]:
    """Evaluation hygiene: a defence's own training data (defender_data, when given) shares no prompt
    with the attack or the eval split. Rosati's premise is an attacker whose samples the defender
    never saw; an eval prompt the defender trained on would flatter its resistance."""
    notes = []
    for i, d in enumerate(spec.defences):
        if d.defender_data is None:
            continue
        rows, note = _read(d.defender_data, f"defences.{i}.defender_data")
        if rows is None:
            notes.append(note)
            continue
        mine = [str(r[d.defender_data.prompt_field]) for r in rows]
        for split in ("eval", "attack"):
            if shared := D.shared_prompts(prompts.get(split, []), mine):
                named = "; ".join(repr(p[:60]) for p in shared[:3])
                raise SpecError(f"spec error: defences.{i}.defender_data: {len(shared)} prompt(s) of data.{split} are "
                                f"in {d.name}'s own training data ({named}{'; ...' if len(shared) > 3 else ''}); "
                                f"the {'held-out prompts' if split == 'eval' else 'attacker'} must be new to the "
                                "defence: drop them from the split")
    return notes


def _check_domains(spec: SweepSpec) -> list[str]:
    """Every row of a split with domain_field names its domain; every domain the space attacks
    with and every defence's immunised_on exists in the attack data, with rows enough."""
    notes, known = [], {}
    for split in ("attack", "eval"):
        src = getattr(spec.data, split)
        if not src.domain_field:
            continue
        rows = _rows(src, f"data.{split}")
        if rows is None:
            notes.append(f"data.{split}: domains not checked (not a local path)")
            continue
        if missing := [i for i, r in enumerate(rows, 1) if r.get(src.domain_field) in (None, "")]:
            raise SpecError(f"spec error: data.{split}.domain_field: row {missing[0]} of {src.source!r} has no "
                            f"{src.domain_field!r} ({len(missing)} rows lack it); give every row its domain")
        known[split] = {str(r[src.domain_field]) for r in rows}
        if split == "attack":
            sizes = {d: sum(str(r[src.domain_field]) == d for r in rows) for d in known[split]}
    if "attack" not in known:
        return notes
    space = dict(spec.space)
    attacked = [d for d in space["attack_domain"].values if d is not None]
    for d in attacked:
        if d not in known["attack"]:
            raise SpecError(f"spec error: space.attack_domain: {d!r} is not a domain of data.attack (its domains: "
                            f"{', '.join(sorted(known['attack']))})")
        if (need := _attack_rows(space)) > sizes[d]:
            raise SpecError(f"spec error: space.dataset_size: {need} exceeds the {sizes[d]} rows of domain {d!r} "
                            f"in data.attack; lower it to at most {sizes[d]}")
    for i, defence in enumerate(spec.defences):
        for d in defence.immunised_on or []:
            if d not in known["attack"]:
                raise SpecError(f"spec error: defences.{i}.immunised_on: {d!r} is not a domain of "
                                f"data.attack (its domains: {', '.join(sorted(known['attack']))}); name one of them")
    if spec.conditions and spec.conditions.generalisation and "eval" in known and attacked \
            and not known["eval"] & set(attacked):
        notes.append("data.eval: no held-out prompt shares a domain with the attacks; the transfer matrix has "
                         "no in-domain column")
    return notes


def _check_conditions(spec: SweepSpec, prompts: dict[str, list[str]]) -> list[str]:
    """The conditions' own data and tools: lm-eval present with every task known, the benign task
    readable, new (no prompt shared with any other split) and large enough."""
    notes = _check_domains(spec)
    c = spec.conditions
    if c is None:
        return notes
    if c.stability and c.stability.lm_eval:
        from trainables import capability

        if msg := capability.missing():
            raise SpecError(f"spec error: conditions.stability.lm_eval: {msg}")
        try:
            capability.check_tasks(c.stability.lm_eval)
        except ValueError as err:
            raise SpecError(f"spec error: conditions.stability.lm_eval: {err}") from None
    t = c.trainability
    if t is None:
        return notes
    from orchestrator.conditions.jobs import benign_config

    try:
        benign_config(spec, spec.base)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "trainability"
        raise SpecError(f"spec error: conditions.trainability: {where}: "
                        f"{first['msg'].removeprefix('Value error, ')}") from None
    train, held = _rows(t.data, "conditions.trainability.data"), _rows(t.eval, "conditions.trainability.eval")
    if train is not None and t.attacker.dataset_size > len(train):
        raise SpecError(f"spec error: conditions.trainability.attacker.dataset_size: {t.attacker.dataset_size} "
                        f"exceeds the {len(train)} rows of conditions.trainability.data; lower it to at most "
                        f"{len(train)}")
    if held is not None and t.target_loss is not None and any(r.get(t.eval.response_field) is None for r in held):
        raise SpecError("spec error: conditions.trainability.eval.response_field: target_loss needs a reference "
                        "answer in every held-out row")
    task = {"data": [str(r[t.data.prompt_field]) for r in train or []],
            "eval": [str(r[t.eval.prompt_field]) for r in held or []]}
    if shared := D.shared_prompts(task["eval"], task["data"]):
        raise SpecError(f"spec error: conditions.trainability.eval: {len(shared)} prompt(s) also in "
                        f"conditions.trainability.data (first: {shared[0][:80]!r}); hold out prompts the fine-tune "
                        "never sees")
    for name, mine in task.items():
        for split, theirs in prompts.items():
            if shared := D.shared_prompts(mine, theirs):
                raise SpecError(f"spec error: conditions.trainability.{name}: {len(shared)} prompt(s) also in "
                                f"data.{split} (first: {shared[0][:80]!r}); the benign task must be new to every "
                                "model, not their alignment or attack data")
    if train is None or held is None:
        notes.append("conditions.trainability: the task's data is not a local path; checked when the run starts")
    return notes
