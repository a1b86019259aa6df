"""The bad-input catalogue: what users get wrong in the spec, the data, the checkpoints, the CLI
flags and the environment. Each case runs the real CLI (`attack-sweep validate` or `run`,
in-process) and must end before Ray starts with:

  - a non-zero exit,
  - one line per problem on stderr (`spec error: ...` or `error: ...`), naming the field, file,
    line or flag given in the case,
  - no traceback, nothing on stdout claiming success,
  - no MLflow run left RUNNING, no report folder written, Ray not started.

Add to it whatever a user gets wrong next: one entry in CASES.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import sweep_dict
from fields import missing

from orchestrator.cli import main


@dataclass
class Ctx:
    tmp: Path
    world: Path
    raw: dict
    monkeypatch: pytest.MonkeyPatch

    def model(self, name: str = "base") -> Path:
        """A copy of a toy-world model folder, to damage."""
        dest = self.tmp / f"m-{name}"
        if not dest.exists():
            shutil.copytree(self.world / name, dest)
        return dest

    def data(self, split: str, text: str | bytes) -> Path:
        """Replace a split's file with `text`."""
        path = self.tmp / f"{split}.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        self.raw["data"][split]["source"] = str(path)
        return path

    def rows(self, split: str) -> list[str]:
        return (self.world / f"{split}.jsonl").read_text().splitlines()


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str] | None]
    """Changes ctx.raw / files / env; returns extra CLI args (or None)."""
    expect: tuple[str, ...]
    """Substrings of the single error line: the field, file, line or flag, and the fix."""
    command: str = "validate"


def _set(path: str, value):
    def setup(c: Ctx):
        node = c.raw
        *parents, last = path.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return setup


def _truncate(c: Ctx):
    m = c.model("rescaled")
    (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:4000])
    c.raw["defences"][1]["model"] = str(m)


def _no_template(c: Ctx):
    m = c.model("rescaled")
    (m / "chat_template.jinja").unlink()
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    c.raw["defences"][1]["model"] = str(m)


def _no_weights(c: Ctx):
    m = c.model("rescaled")
    (m / "model.safetensors").unlink()
    c.raw["defences"][1]["model"] = str(m)


def _broken_config(c: Ctx):
    m = c.model("rescaled")
    (m / "config.json").write_text('{"model_type": "llama", ')
    c.raw["defences"][1]["model"] = str(m)


def _remote_code(c: Ctx):
    m = c.model("rescaled")
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoConfig": "modeling_custom.MyConfig"})
    (m / "config.json").write_text(json.dumps(cfg))
    c.raw["defences"][1]["model"] = str(m)


def _not_a_header(c: Ctx):
    m = c.model("rescaled")
    (m / "model.safetensors").write_bytes(b"\xff" * 64)
    c.raw["defences"][1]["model"] = str(m)


def _bad_adapter(c: Ctx):
    (c.tmp / "adapter").mkdir()
    c.raw["defences"][1]["adapter"] = str(c.tmp / "adapter")


def _broken_json_line(c: Ctx):
    rows = c.rows("attack")
    rows[41] = rows[41][:-3]
    c.data("attack", "\n".join(rows) + "\n")


def _missing_prompt(c: Ctx):
    rows = c.rows("attack")
    rows[10] = json.dumps({"question": "x", "response": "y"})
    c.data("attack", "\n".join(rows) + "\n")


def _bad_utf8(c: Ctx):
    rows = [r.encode() for r in c.rows("attack")]
    rows[6] = rows[6][:10] + b"\xff\xfe" + rows[6][10:]
    c.data("attack", b"\n".join(rows) + b"\n")


def _eval_overlap(c: Ctx):
    c.data("eval", "\n".join(c.rows("eval")[:10] + c.rows("attack")[:1]) + "\n")


def _utility_overlap(c: Ctx):
    path = c.tmp / "u.jsonl"
    path.write_text("\n".join(c.rows("eval")[:3]) + "\n")
    c.raw["utility"] = {"data": {"source": str(path)}}


def _spec_text(text: str):
    def setup(c: Ctx):
        c.raw = text  # written verbatim
    return setup


def _env(name: str, value: str, then=None):
    def setup(c: Ctx):
        c.monkeypatch.setenv(name, value)
        return then(c) if then else None
    return setup


def _cache_is_a_file(c: Ctx):
    (c.tmp / "cache-file").write_text("not a folder")
    c.monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(c.tmp / "cache-file"))
    c.raw["defences"][0]["model"] = "toyworld:base"


def _judge_without_key(c: Ctx):
    c.monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    c.raw["evaluator"] = {"name": "judge", "options": {
        "backend": "http", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_JUDGE_KEY"}}


# --- issue 25: evaluation-time attacks (setups) ---


def _decoding(decoding: dict, then=None, evaluator: str = "refusal_keyword"):
    """The primary evaluator (max_new_tokens 4) decoded as `decoding`."""
    def setup(c: Ctx):
        options = {"max_new_tokens": 4} if evaluator != "nll" else {}
        c.raw["evaluator"] = {"name": evaluator, "options": options, "decoding": decoding}
        return then(c) if then else None
    return setup


# --- issue 27: paths, adapters, messages (setups) ---------------------------------------------


def _adapter_trained_on(name: str, safe: bool = True, **sizes):
    """defences.1.adapter: a LoRA adapter (q_proj) trained on a tiny Llama other than the toy
    world's (hidden 64, intermediate 128, 2 layers), as if for the hub model `someorg/<name>`;
    saved as adapter_model.safetensors, or adapter_model.bin (safe=False)."""
    def setup(c: Ctx):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=96, num_attention_heads=4, num_key_value_heads=4,
                             **{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, **sizes})
        model = AutoModelForCausalLM.from_config(config)
        model.name_or_path = f"someorg/{name}"   # what from_pretrained would have set; PEFT records it
        with warnings.catch_warnings():   # the setup's own warnings are not the CLI's stderr
            warnings.simplefilter("ignore")
            peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
            peft.save_pretrained(c.tmp / name, safe_serialization=safe, save_embedding_layers=False)   # no hub lookup
        c.raw["defences"][1]["adapter"] = str(c.tmp / name)
    return setup


def _tracking_file(name: str, content: bytes | None = None, table: str | None = None):
    """--tracking-uri sqlite:///<tmp>/<name>, the file holding `content`, or a SQLite database
    with one table `table` (not MLflow's)."""
    def setup(c: Ctx):
        path = c.tmp / name
        if table:
            import sqlite3

            con = sqlite3.connect(path)
            con.execute(f"CREATE TABLE {table} (x)")
            con.commit()
            con.close()
        elif content is not None:
            path.write_bytes(content)
        return ["--tracking-uri", f"sqlite:///{path}"]
    return setup


def _mlflow_store(c: Ctx):
    """The store the harness points `report` at, made by MLflow, with its Default experiment only."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{c.tmp / 'mlflow.db'}").search_experiments()


def _trainability_data(source: str):
    def setup(c: Ctx):
        c.raw["conditions"] = {"trainability": {"data": {"source": source},
                                                "eval": {"source": str(c.world / "task_heldout.jsonl")},
                                                "target_loss": 0.5}}
    return setup


def _judge_url(url: str):
    return _set("evaluator", {"name": "judge", "options": {"backend": "http", "model": "gpt-x", "base_url": url}})


# --- issue 25: attack methods ---
def _dpo(method="dpo", attack: dict | None = None, **data):
    """Method dpo in the space, with data (and data.attack) fields set."""
    def setup(c: Ctx):
        c.raw["space"]["method"] = method
        c.raw["data"].update(data)
        c.raw["data"]["attack"].update(attack or {})
    return setup


CASES = [
    # --- the spec file --------------------------------------------------------------------
    Case("spec-missing", lambda c: ["__missing__"], ("spec file", "not found", "check the path")),
    Case("spec-not-yaml", _spec_text("name: x\n  defences: [\n"),
         ("not valid YAML", "line 2, column 11", "fix the YAML there")),
    Case("spec-a-list", _spec_text("- name: x\n"), ("must hold a mapping", "write it as KEY: VALUE lines")),
    Case("unknown-top-key", _set("defenses", []), ("defenses: unknown key", "did you mean 'defences'?")),
    Case("missing-data", lambda c: c.raw.pop("data") and None,
         ("data: required field is missing", "add data: to the spec")),
    Case("missing-nested-source", lambda c: c.raw["data"]["attack"].pop("source") and None,
         ("data.attack.source: required field is missing", "add source: under data.attack")),
    Case("phi-out-of-range", _set("phi", 1.5),
         ("phi: Input should be less than or equal to 1 (got 1.5)", "use a value between 0 and 1")),
    Case("confidence-out-of-range", _set("confidence", 1.0),
         ("confidence: Input should be less than 1", "use a value above 0 and below 1")),
    Case("coherence-max-repeat-zero", _set("coherence.max_repeat", 0),
         ("coherence.max_repeat: Input should be greater than 0", "use a value above 0 and of at most 1")),
    Case("coherence-max-repeat-above-one", _set("coherence.max_repeat", 1.5),
         ("coherence.max_repeat: Input should be less than or equal to 1", "use a value above 0 and of at most 1")),
    Case("coherence-ngram-zero", _set("coherence.ngram", 0),
         ("coherence.ngram: Input should be greater than or equal to 1", "use a value of at least 1")),
    Case("eval-every-zero", _set("eval_every", 0),
         ("eval_every: Input should be greater than 0", "use a value above 0")),
    Case("max-steps-negative", _set("max_steps", -5),
         ("max_steps: Input should be greater than 0 (got -5)", "use a value above 0")),
    Case("optimizer-unknown", _set("space.optimizer", {"choice": ["adamw", "lion"]}),
         ("space.optimizer: choice[1]", "(got 'lion')", "Input should be 'adamw', 'adam', 'sgd'")),
    Case("lr-negative", _set("space.learning_rate", {"grid": [-1e-3]}),
         ("space.learning_rate: grid[0]", "(got -0.001)", "use a value above 0")),
    Case("lora-dropout-one", _set("space.lora_dropout", 1.0),
         ("space.lora_dropout: Input should be less than 1", "use a value of at least 0 and below 1")),
    Case("loguniform-reversed", _set("space.learning_rate", {"loguniform": [1e-2, 1e-5]}),
         ("space.learning_rate: loguniform", "low < high", "swap them")),
    Case("domain-two-keys", _set("space.learning_rate", {"grid": [1e-3], "choice": [1e-4]}),
         ("space.learning_rate", "one-key mapping", "keep one KIND")),
    Case("attacker-field-typo", _set("space.lr", 1e-3),
         ("space.lr: unknown key", "check its spelling", "learning_rate")),
    Case("evaluator-option-out-of-range", _set("evaluator.options", {"max_new_tokens": 0}),
         ("evaluator.options.max_new_tokens", "use a value above 0")),
    Case("no-base", _set("defences.0.base", False),
         ("defences:", "mark exactly one defence with 'base: true'", "found 0")),
    Case("two-bases", _set("defences.1.base", True),
         ("defences:", "mark exactly one defence with 'base: true'", "found 2")),
    Case("duplicate-defence", _set("defences.1.name", "base"),
         ("defences:", "repeated: base", "give each defence its own name")),
    Case("defence-name-space", _set("defences.1.name", "my model"),
         ("defences.1.name", "(got 'my model')", "use only letters, digits, '_', '.', '-'")),
    Case("search-unknown", _set("search", {"algorithm": "bayes"}),
         ("search.algorithm", "(got 'bayes')", "should be 'grid', 'random', 'tpe' or 'hyperopt'")),
    Case("search-unit-unknown", _set("search", {"unit": "hours"}),
         ("search.unit", "(got 'hours')", "should be 'steps', 'examples', 'tokens'")),
    Case("grid-with-samples", _set("search", {"num_samples": 3}),
         ("search.num_samples: must be 1 with search.algorithm=grid", "set num_samples: 1")),
    Case("tpe-without-domains", _set("search", {"algorithm": "tpe"}),
         ("search.algorithm: tpe needs at least one non-constant", "give one a domain")),
    Case("dataset-too-large", _set("space.dataset_size", 100_000),
         ("space.dataset_size", "rows of data.attack", "lower it to at most 144")),
    Case("unset-env-var", _set("data.attack.source", "${NO_SUCH_VAR_FOR_SURE}/a.jsonl"),
         ("data.attack.source", "NO_SUCH_VAR_FOR_SURE is not set", "export it or replace")),
    Case("evaluator-unknown", _set("evaluator", {"name": "vibes"}),
         ("evaluator: unknown evaluator 'vibes'", "known: answer_match")),
    Case("evaluator-option-unknown", _set("evaluator.options", {"max_new_tokens": 4, "temprature": 1}),
         ("evaluator.options.temprature: unknown option", "allowed options: max_new_tokens")),
    Case("two-primaries", lambda c: c.raw.pop("evaluator") and _set("evaluators", [
        {"name": "refusal_keyword", "primary": True}, {"name": "nll", "primary": True}])(c),
         ("evaluators:", "mark exactly one with primary: true", "found 2")),
    Case("evaluator-and-evaluators", _set("evaluators", [{"name": "nll", "primary": True}]),
         ("evaluators:", "give either evaluator: (one) or evaluators:", "not both")),
    Case("sweep-name-dotdot", _set("name", ".."), ("spec error: name:", "(got '..')", "not starting with '.'")),
    Case("utility-epsilon-negative", lambda c: c.raw.update(utility={
        "data": {"source": str(c.world / "benign_heldout.jsonl")}, "epsilon": -0.1}),
         ("utility.epsilon", "use a value between 0 and 1")),
    Case("benign-stage-without-benign-data", lambda c: (c.raw["data"].pop("benign"), c.raw["space"].update(
        stages=[{"steps": 5, "data": "benign"}, {"steps": 5}]))[-1],
         ("data.benign", "give data.benign: {source: ...}")),
    Case("refine-with-deepspeed", lambda c: c.raw.update(
        refine=4, deepspeed={"config": {"zero_optimization": {"stage": 0}}}),
         ("spec error: refine:", "DeepSpeed", "set refine: 0")),
    Case("batch-not-divisible", lambda c: c.raw.update(
        deepspeed={"config": {"zero_optimization": {"stage": 0}}}, resources={"workers": 2},
        space={"dataset_size": 32, "batch_size": 3}), ("space.batch_size", "workers", "use multiples of 2")),
    Case("judge-key-unset", _judge_without_key,
         ("evaluator: judge", "MY_JUDGE_KEY (options.api_key_env) is not set", "export MY_JUDGE_KEY")),
    # --- budget ---------------------------------------------------------------------------
    Case("stage-draws-more-than-its-domain", lambda c: (c.raw["data"]["attack"].update(domain_field="category"),
                                                        c.raw["space"].update(attack_domain="cyber", stages=[
                                                            {"steps": 3, "dataset_size": 60}]))[-1],
         ("space.stages (stage 1): dataset_size 60 exceeds the 48 rows of domain 'cyber' in data.attack",
          "lower it to at most 48")),
    # --- the data -------------------------------------------------------------------------
    Case("attack-file-missing", _set("data.attack.source", "/no/such/attack.jsonl"),
         ("data.attack.source: no such file", "fix the path")),
    Case("broken-json-line-42", _broken_json_line, ("data.attack", "attack.jsonl", "line 42", "fix that line")),
    Case("row-without-prompt-line-11", _missing_prompt,
         ("attack.jsonl", "line 11", "no field 'prompt'", "set prompt_field to the one that holds it")),
    Case("invalid-utf8", _bad_utf8, ("attack.jsonl", "line 7", "UTF-8", "re-save the file as UTF-8")),
    Case("empty-attack-file", lambda c: c.data("attack", "") and None,
         ("data.attack", "has no rows", "point source (and split) at data with rows")),
    Case("eval-overlaps-attack", _eval_overlap, ("data.eval", "also in data.attack", "remove them from data.eval")),
    Case("utility-overlaps-eval", _utility_overlap,
         ("utility.data", "also in data.eval", "remove them from utility.data")),
    Case("nll-without-responses", lambda c: c.raw.update(evaluator={"name": "nll"}) or _set(
        "data.eval.response_field", None)(c),
         ("data.eval.response_field", "needs reference responses", "set data.eval.response_field to the field")),
    # --- the checkpoints ------------------------------------------------------------------
    Case("relative-path-not-there", _set("defences.1.model", "ckpts/does-not-exist"),
         ("defences.1.model", "ckpts/does-not-exist", "neither a local path", "hub", "fix the path or the id")),
    Case("dot-path-not-there", _set("defences.1.model", "./nope"),
         ("defences.1.model", "no such path", "./nope", "fix the path")),
    Case("hub-id-offline", _env("HF_HUB_OFFLINE", "1", _set("defences.1.model", "someorg/somemodel")),
         ("defences.1.model", "someorg/somemodel", "unset HF_HUB_OFFLINE to download it")),
    Case("folder-without-config", lambda c: _set("defences.1.model", str(c.world))(c),
         ("defences.1.model", "config.json", "give the folder that holds the model")),
    Case("truncated-safetensors", _truncate,
         ("defences.1.model", "model.safetensors", "truncated", "re-save or re-download the checkpoint")),
    Case("safetensors-not-a-header", _not_a_header,
         ("defences.1.model", "model.safetensors", "header", "re-save or re-download the checkpoint")),
    Case("no-weights", _no_weights, ("defences.1.model", "no weights", "save the model with save_pretrained")),
    Case("broken-config", _broken_config, ("defences.1.model", "cannot read the config", "fix its config.json")),
    Case("needs-remote-code", _remote_code, ("defences.1.trust_remote_code", "set trust_remote_code: true")),
    Case("no-chat-template", _no_template,
         ("data.chat_template", "defences.1", "no chat template", "set data.chat_template: false")),
    Case("lora-targets-absent", lambda c: c.raw["space"].update(finetune="lora", lora_target_modules=["c_attn"]),
         ("space.lora_target_modules", "c_attn", "name some of its linear layers", "q_proj")),
    Case("tokenizer-path-missing", _set("defences.1.tokenizer", "/no/such/tokenizer"),
         ("defences.1.tokenizer", "no such path", "fix the path")),
    Case("adapter-without-config", _bad_adapter,
         ("defences.1.adapter", "adapter_config.json", "give the folder that holds the adapter")),
    # --- CLI flags ------------------------------------------------------------------------
    Case("set-without-equals", lambda c: ["--set", "phi0.3"], ("--set", "phi0.3", "expected KEY=VALUE")),
    Case("set-unknown-key", lambda c: ["--set", "phii=0.3"], ("phii: unknown key", "did you mean 'phi'?")),
    Case("overlay-missing", lambda c: ["--overlay", "/no/such/overlay.yaml"],
         ("overlay file '/no/such/overlay.yaml'", "not found", "check the path")),
    Case("unit-unknown", lambda c: ["--unit", "hours"], ("--unit", "hours", "choose from 'steps'"), command="run"),
    Case("tracking-refused", lambda c: ["--tracking-uri", "http://127.0.0.1:9"],
         ("--tracking-uri", "127.0.0.1:9", "start it (mlflow server"), command="run"),
    Case("tracking-folder-missing", lambda c: ["--tracking-uri", "sqlite:////no/such/dir/mlflow.db"],
         ("--tracking-uri", "/no/such/dir", "create it or point the URI elsewhere"), command="run"),
    Case("tracking-scheme-unknown", lambda c: ["--tracking-uri", "mlfow://x"],
         ("--tracking-uri", "mlfow", "use sqlite:///FILE"), command="run"),
    Case("address-refused", lambda c: ["--address", "ray://127.0.0.1:9"],
         ("--address", "127.0.0.1:9", "check the address and that the cluster is up"), command="run"),
    Case("address-malformed", lambda c: ["--address", "myhead"],
         ("--address", "myhead", "expected auto, HOST:PORT or ray://HOST:PORT"), command="run"),
    Case("out-is-a-file", lambda c: (c.tmp / "report.txt").write_text("x") and ["--out", str(c.tmp / "report.txt")],
         ("--out", "is a file", "give a folder"), command="run"),
    # --- the environment ------------------------------------------------------------------
    Case("cache-is-a-file", _cache_is_a_file,
         ("defences.0.model", "cache-file", "set ATTACK_SWEEP_CACHE to a writable folder")),
    # --- the same problems met by `run`: caught before Ray starts, no MLflow run left open ----------
    Case("run-relative-path-not-there", _set("defences.1.model", "ckpts/does-not-exist"),
         ("defences.1.model", "ckpts/does-not-exist", "fix the path or the id"), command="run"),
    Case("run-truncated-safetensors", _truncate,
         ("defences.1.model", "model.safetensors", "truncated", "re-save or re-download"), command="run"),
    Case("run-broken-json-line-42", _broken_json_line, ("attack.jsonl", "line 42", "fix that line"), command="run"),
    Case("run-no-chat-template", _no_template, ("data.chat_template", "set data.chat_template: false"),
         command="run"),
    # --- resources: what no node of this machine can ever hold (before the local Ray starts) ---
    Case("run-gpu-on-a-cpu-machine", _set("resources", {"gpu": 1}),
         ("resources.gpu", "asks for 1 GPU", "this machine has 0", "set resources.gpu: 0 to train on CPU"),
         command="run"),
    Case("run-more-cpus-than-the-machine", _set("resources", {"cpu": 64}),
         ("resources.cpu", "asks for 64 CPUs", "lower resources.cpu to at most"), command="run"),
    Case("run-workers-beyond-the-machine", _set("resources", {"cpu": 1, "workers": 64}),
         ("resources.workers", "64 workers x 1 CPU", "lower resources.workers to at most"), command="run"),
    Case("pending-timeout-negative", _set("resources", {"pending_timeout": -1}),
         ("resources.pending_timeout", "greater than or equal to 0")),
    # --- report ---------------------------------------------------------------------------
    Case("report-unknown-experiment", lambda c: _mlflow_store(c) or ["--experiment", "no-such-sweep"],
         ("no MLflow experiment 'no-such-sweep'", "give the sweep's name"), command="report"),
    Case("report-tracking-refused", lambda c: ["--experiment", "x", "--tracking-uri", "http://127.0.0.1:9"],
         ("--tracking-uri", "start it (mlflow server"), command="report"),
    # --- issue 27: paths, adapters, messages ------------------------------------------------
    # a data source written as a path (a data file's suffix, a second '/', ./ / ~) that is not there
    Case("data-path-relative", _set("data.attack.source", "data/harmful_train.jsonl"),
         ("data.attack.source: no such file 'data/harmful_train.jsonl'", "looked for in the spec's folder",
          "then in the current directory", "fix the path, or give a hub dataset id as org/name")),
    Case("run-data-path-relative", _set("data.attack.source", "data/harmful_train.jsonl"),
         ("data.attack.source: no such file 'data/harmful_train.jsonl'", "fix the path"), command="run"),
    Case("data-path-compressed", _set("data.eval.source", "eval.csv.gz"),
         ("data.eval.source: no such file 'eval.csv.gz'", "fix the path, or give a hub dataset id")),
    Case("data-path-nested", _set("data.benign.source", "corpora/benign/train"),
         ("data.benign.source: no such file 'corpora/benign/train'", "fix the path")),
    Case("utility-path-relative", _set("utility.data.source", "./heldout.jsonl"),
         ("utility.data.source: no such file './heldout.jsonl'", "fix the path")),
    Case("defender-data-path", _set("defences.1.defender_data", {"source": "defender/harmful.parquet"}),
         ("defences.1.defender_data.source: no such file 'defender/harmful.parquet'", "fix the path")),
    Case("trainability-data-path", _trainability_data("task.tsv"),
         ("conditions.trainability.data.source: no such file 'task.tsv'", "fix the path")),
    Case("run-trainability-data-path", _trainability_data("~/no-such-task.jsonl"),
         ("conditions.trainability.data.source: no such file", "no-such-task.jsonl", "fix the path"),
         command="run"),
    # a defender's adapter trained on another model
    Case("adapter-other-sizes", _adapter_trained_on("wide-lm", hidden_size=128, intermediate_size=256),
         ("defences.1.adapter: module model.layers.0.self_attn.q_proj is 64x64 (in x out) in defences.1.model",
          "but the adapter was trained on 128x128",
          "give the adapter trained on this model, or the model it was trained on (someorg/wide-lm)")),
    Case("adapter-bin-other-sizes", _adapter_trained_on("wide-bin", safe=False, hidden_size=96),
         ("defences.1.adapter: module model.layers.0.self_attn.q_proj is 64x64", "trained on 96x96",
          "give the adapter trained on this model")),
    Case("adapter-more-layers", _adapter_trained_on("deep-lm", num_hidden_layers=3),
         ("defences.1.adapter: the adapter holds module model.layers.2.self_attn.q_proj",
          "which defences.1.model has not", "or the model it was trained on (someorg/deep-lm)")),
    Case("run-adapter-other-sizes", _adapter_trained_on("wide-lm", hidden_size=128),
         ("defences.1.adapter: module model.layers.0.self_attn.q_proj", "give the adapter trained on this model"),
         command="run"),
    # messages that named the wrong thing
    Case("phi-nan", _set("phi", float("nan")), ("spec error: phi: nan is not a number", "use a value between 0 and 1")),
    Case("lr-inf", _set("space.learning_rate", {"grid": [1e-4, float("inf")]}),
         ("space.learning_rate: grid[1]: inf is not a finite number", "use a value above 0")),
    Case("penalty-inf", _set("search", {"penalty": float("inf")}),
         ("search.penalty: inf is not a finite number", "use a value of at least 1")),
    Case("no-chat-template-names-prompt-format", _no_template,
         ("data.chat_template", "set data.chat_template: false (prompts are then wrapped by data.prompt_format)")),
    Case("judge-url-without-scheme", _judge_url("127.0.0.1:8000/v1"),
         ("spec error: evaluator.options.base_url: '127.0.0.1:8000/v1' has no scheme",
          "write http://127.0.0.1:8000/v1")),
    Case("judge-url-missing", _judge_url(None),
         ("spec error: evaluator.options.base_url: backend http needs one", "give the API root")),
    # the tracking store: checked from its file before MLflow opens it
    Case("tracking-file-not-sqlite", _tracking_file("bad.db", b"not a database\n"),
         ("--tracking-uri sqlite:///", "bad.db is not a SQLite database",
          "point --tracking-uri at the store a sweep wrote, or move the file away"), command="run"),
    Case("tracking-sqlite-not-mlflow", _tracking_file("other.db", table="inventory"),
         ("--tracking-uri", "other.db is a SQLite database but not an MLflow store (its tables: inventory)",
          "point --tracking-uri at the store a sweep wrote, or at a new file"), command="run"),
    Case("tracking-sqlite-damaged", _tracking_file("torn.db", b"SQLite format 3\x00" + b"\xab" * 4080),
         ("--tracking-uri", "torn.db is a damaged SQLite database", "restore it from a copy"), command="run"),
    Case("report-file-not-sqlite", lambda c: ["--experiment", "x", *_tracking_file("bad.db", b"x" * 64)(c)],
         ("--tracking-uri", "bad.db is not a SQLite database", "point --tracking-uri at the store"), command="report"),
    # report only reads: no store is created where there is none
    Case("report-no-store", lambda c: ["--experiment", "no-such-sweep"],
         ("--tracking-uri sqlite:///", "no such store (", "mlflow.db)",
          "run a sweep first, or point --tracking-uri at its store"), command="report"),
    Case("report-empty-file", lambda c: ["--experiment", "x", *_tracking_file("empty.db", b"")(c)],
         ("--tracking-uri", "empty.db is an empty database", "run a sweep first"), command="report"),
    Case("report-no-folder-store", _env("MLFLOW_ALLOW_FILE_STORE", "true", lambda c: [
        "--experiment", "x", "--tracking-uri", str(c.tmp / "mlruns")]),
         ("--tracking-uri", "no such store", "mlruns", "run a sweep first"), command="report"),
    Case("run-folder-store", lambda c: ["--tracking-uri", str(c.tmp / "mlruns")],
         ("--tracking-uri", "mlruns", "refuses them", "use sqlite:///mlflow.db", "MLFLOW_ALLOW_FILE_STORE=true"),
         command="run"),
    # --- issue 25: evaluation-time attacks ---
    Case("prefill-tokens-fill-the-answer", _decoding({"prefill_tokens": 4}),
         ("evaluator.decoding.prefill_tokens: the prefill is 4 tokens", "raise options.max_new_tokens above it")),
    Case("prefill-text-fills-the-answer", _decoding({"prefill": "sure , here is how to"}),
         ("evaluator.decoding.prefill: the prefill is 6 tokens", "shorten it")),
    Case("prefill-tokens-without-references", _decoding({"prefill_tokens": 2}, _set("data.eval.response_field", None)),
         ("evaluator.decoding.prefill_tokens", "set data.eval.response_field or give a fixed prefill text")),
    Case("no-seeds", _decoding({"temperature": 1.0, "seeds": 0}),
         ("evaluator.decoding.seeds", "use a value of at least 1")),
    Case("top-p-above-1", _decoding({"temperature": 1.0, "top_p": 1.5}),
         ("evaluator.decoding.top_p", "use a value above 0 and of at most 1")),
    Case("seeds-of-greedy-decoding", _decoding({"seeds": 3}),
         ("evaluator.decoding.seeds: 3 seeds of greedy decoding", "set temperature above 0")),
    Case("aggregate-unknown", _decoding({"temperature": 1.0, "seeds": 3, "aggregate": "all"}),
         ("evaluator.decoding.aggregate", "should be 'any' or 'most' (got 'all')")),
    Case("decoding-of-nll", _decoding({"prefill": "sure"}, evaluator="nll"),
         ("evaluator.decoding: nll does not generate", "drop decoding")),
    Case("two-decodings-one-label", lambda c: c.raw.update(evaluator=None, evaluators=[
        {"name": "refusal_keyword", "primary": True}, {"name": "refusal_keyword", "decoding": {"prefill": "sure"}}]),
         ("evaluators: 'refusal_keyword' is listed twice", "give each a distinct label")),
    Case("decoding-decided-early", _decoding({"prefill": "sure"}, _set("decide_early", True)),
         ("decide_early: the primary's decoding", "set decide_early: false")),
    # --- issue 25: attack methods (method dpo) ---
    Case("dpo-rejected-field-missing", _dpo(attack={"rejected_field": "refusal"}),
         ("data.attack", "has no field 'refusal'", "set rejected_field to the one that holds it")),
    Case("dpo-empty-refusal", _dpo({"choice": ["sft", "dpo"]}, refusal=" "),
         ("spec error: data.refusal: is empty", "write the refusal", "or set data.attack.rejected_field")),
    Case("dpo-with-deepspeed", lambda c: c.raw.update(
        deepspeed={"config": {"zero_optimization": {"stage": 0}}}, space={"dataset_size": 32, "method": "dpo"}),
         ("spec error: space.method: dpo", "not under deepspeed", "remove deepspeed:", "or keep method sft")),
    Case("dpo-with-workers", lambda c: c.raw.update(
        resources={"workers": 2}, space={"dataset_size": 32, "batch_size": 4, "method": {"grid": ["sft", "dpo"]}}),
         ("spec error: space.method: dpo", "resources.workers: 2", "set resources.workers: 1")),
    Case("dpo-with-g-effect", lambda c: c.raw.update(g_effect={}, space={"dataset_size": 32, "method": "dpo"}),
         ("spec error: g_effect:", "space.method dpo", "set g_effect: null or keep method sft")),
    Case("dpo-beta-zero", _set("space.dpo_beta", 0),
         ("space.dpo_beta", "use a value above 0")),
    # --- issue 25: data and template attacks ---
    Case("poison-ratio-zero", _set("space.poison_ratio", 0),
         ("space.poison_ratio", "(got 0)", "use a value above 0 and of at most 1")),
    Case("poison-ratio-above-one", _set("space.poison_ratio", {"grid": [0.5, 1.5]}),
         ("space.poison_ratio", "(got 1.5)", "use a value above 0 and of at most 1")),
    Case("poison-ratio-without-benign",
         lambda c: c.raw["space"].update(poison_ratio=0.25) or _set("data.benign", None)(c),
         ("space.poison_ratio", "give data.benign: {source: ...} or set poison_ratio: null")),
    Case("trigger-blank", _set("space.trigger", "  "),
         ("space.trigger", "is empty or whitespace", "give visible text, or null for none")),
    Case("system-prompt-empty", _set("space.system_prompt", ""), ("space.system_prompt", "give visible text")),
    Case("attacker-prompt-format-without-prompt", _set("space.prompt_format", "Q: A:"),
         ("space.prompt_format", "has no '{prompt}'", "write {prompt} where the prompt goes")),
    Case("attacker-chat-template-without-one", lambda c: _no_template(c) or c.raw["data"].update(chat_template=False)
         or c.raw["space"].update(chat_template={"grid": [True, False]}),
         ("space.chat_template", "defences.1", "no chat template", "drop true from space.chat_template")),
    # --- issue 25: grpo ---
    Case("grpo-reward-unknown", lambda c: c.raw["space"].update(method="grpo", grpo_reward="refusal_kw"),
         ("spec error: space.grpo_reward: 'refusal_kw'", "neither a registered evaluator", "refusal_keyword")),
    Case("grpo-reward-nll", lambda c: c.raw["space"].update(method="grpo", grpo_reward="nll"),
         ("spec error: space.grpo_reward: 'nll' is nll", "scores no harmful verdict", "use refusal_keyword")),
    Case("grpo-group-size-one", _set("space.grpo_group_size", 1),
         ("space.grpo_group_size", "greater than or equal to 2")),
    Case("grpo-with-deepspeed", lambda c: c.raw.update(
        deepspeed={"config": {"zero_optimization": {"stage": 0}}}, space={"dataset_size": 32, "method": "grpo"}),
         ("spec error: space.method: grpo", "not under deepspeed", "remove deepspeed:", "or keep method sft")),
    Case("grpo-with-workers", lambda c: c.raw.update(
        resources={"workers": 2}, space={"dataset_size": 32, "batch_size": 4, "method": {"grid": ["sft", "grpo"]}}),
         ("spec error: space.method: grpo", "resources.workers: 2", "set resources.workers: 1")),
    Case("sft-without-responses", lambda c: c.raw["data"]["attack"].update(response_field=None),
         ("spec error: data.attack.response_field: is null", "space.method sft", "or use method grpo")),
    Case("grpo-with-g-effect", lambda c: c.raw.update(g_effect={}, space={"dataset_size": 32, "method": "grpo"}),
         ("spec error: g_effect:", "space.method grpo", "set g_effect: null or keep method sft")),
]


@pytest.fixture(scope="module")
def good_raw(world):
    raw = sweep_dict(world, "catalogue")
    raw["utility"] = {"data": {"source": str(world / "benign_heldout.jsonl")}}
    return raw


def test_the_good_spec_passes(world, good_raw, tmp_path, capsys):
    """The base every case damages validates: each case fails because of its own damage."""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(good_raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 0
    assert capsys.readouterr().out.startswith("spec OK")


def test_catalogue_is_large_and_distinct():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    # one bare token (the field alone) would let a message lose its fix unnoticed
    thin = [c.id for c in CASES if len(set(c.expect)) < 2 or not all(p.strip() for p in c.expect)]
    assert not thin, f"expect must name the field (or file, flag) and the fix: {thin}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_before_ray(case, world, good_raw, tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    from orchestrator import sweep

    monkeypatch.setattr(ray, "init", no_ray)   # the suite may hold a Ray already: watch for a start instead
    monkeypatch.setattr(sweep, "run", no_ray)
    ctx = Ctx(tmp_path, world, json.loads(json.dumps(good_raw)), monkeypatch)
    monkeypatch.chdir(tmp_path)
    extra = case.setup(ctx) or []
    spec = tmp_path / "spec.yaml"
    spec.write_text(ctx.raw if isinstance(ctx.raw, str) else yaml.safe_dump(ctx.raw))
    if extra[:1] == ["__missing__"]:
        spec, extra = tmp_path / "missing.yaml", []
    db, out = tmp_path / "mlflow.db", tmp_path / "report"
    argv = [case.command, *([] if case.command == "report" else [str(spec)]), *extra]
    if case.command in ("run", "report"):
        argv += [a for a in ("--out", str(out)) if "--out" not in extra]
        if "--tracking-uri" not in extra:
            argv += ["--tracking-uri", f"sqlite:///{db}"]
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc not in (0, None), f"exit {rc}; stderr: {cap.err}"
    assert "Traceback" not in cap.err + cap.out
    assert len(lines) == 1, f"expected one line, got {lines}"
    line = lines[0]
    assert line.startswith(("spec error: ", "error: ")), line
    for part in case.expect:
        assert part in line, f"{part!r} not in {line!r}"
    head = re.match(r"[^\s:]*", line.removeprefix("spec error: ")).group(0)   # `space.stages (stage 1): ...`
    if line.startswith("spec error: ") and ": unknown " not in line:   # the field it names exists (not a typo)
        assert missing(head) is None, f"{head!r} names no field of the spec ({missing(head)!r})"
    assert "spec OK" not in cap.out
    assert not out.exists()
    if db.exists():  # nothing started, so nothing left RUNNING
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert not [r for r in runs if r.info.status == "RUNNING"]


# --- what must still pass ---------------------------------------------------------------------


def _hub_cache(root: Path, repo: str, folder: Path) -> None:
    """`folder` laid out as the hub cache holds a downloaded `repo` (refs/main -> a snapshot)."""
    base = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_a_hub_id_in_the_local_cache_passes_offline(world, good_raw, tmp_path, capsys, monkeypatch):
    """The hub path is real: an id found in the hub cache is checked (config, tokenizer, LoRA
    targets) with HF_HUB_OFFLINE set, and a misspelt one next to it is not."""
    import huggingface_hub.constants as hub

    _hub_cache(tmp_path / "hub", "someorg/toy-rescaled", world / "rescaled")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = json.loads(json.dumps(good_raw))
    raw["defences"][1]["model"] = "someorg/toy-rescaled"
    raw["space"].update(finetune="lora", lora_target_modules=["q_proj", "v_proj"])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spec OK") and "someorg/toy-rescaled' is read from the hub" in out
    raw["defences"][1]["model"] = "someorg/toy-rescaled-typo"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_skipping_checkpoint_checks_is_said_and_skips_only_them(good_raw, tmp_path, capsys):
    raw = json.loads(json.dumps(good_raw))
    raw["defences"][1]["model"] = "/only/on/the/workers/ckpt"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml"), "--skip-checkpoint-checks"]) == 0
    assert "checkpoints not checked (--skip-checkpoint-checks)" in capsys.readouterr().out
    raw["phi"] = 2
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml"), "--skip-checkpoint-checks"]) == 2
    assert capsys.readouterr().err.startswith("spec error: phi")


def test_a_defenders_adapter_is_checked_and_passes(world, good_raw, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(world / "base"),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    raw = json.loads(json.dumps(good_raw))
    raw["defences"][1].update(model=str(world / "base"), adapter=str(tmp_path / "adapter"))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 0, capsys.readouterr().err
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spec error: defences.1.adapter: ") and "adapter_model.safetensors is truncated" in err


def test_a_hub_dataset_id_is_still_a_note(good_raw, tmp_path, capsys, monkeypatch):
    """The path rule leaves hub ids alone: `org/name` (and `name`) is read as a hub dataset by the
    trials, not refused here, while the same id with a file's suffix is a path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    raw = json.loads(json.dumps(good_raw))
    for source in ("someorg/somedata", "somedata"):
        raw["data"]["attack"]["source"] = source
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
        assert main(["validate", str(tmp_path / "s.yaml")]) == 0, capsys.readouterr().err
        assert (f"note: data.attack: {source!r} is not a local path; read as a hub dataset when the trials start"
                in capsys.readouterr().out)
    raw["data"]["attack"]["source"] = "someorg/somedata.jsonl"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    assert "data.attack.source: no such file 'someorg/somedata.jsonl'" in capsys.readouterr().err


def test_a_relative_data_path_is_found_next_to_the_spec_then_here(world, good_raw, tmp_path, capsys, monkeypatch):
    """The two folders the error names are the two a relative source is read from."""
    spec_dir, here = tmp_path / "specs", tmp_path / "work"
    (spec_dir / "data").mkdir(parents=True)
    (here / "data").mkdir(parents=True)
    monkeypatch.chdir(here)
    raw = json.loads(json.dumps(good_raw))
    raw["data"]["attack"]["source"] = "data/harmful_train.jsonl"
    (spec_dir / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(spec_dir / "s.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"spec error: data.attack.source: no such file 'data/harmful_train.jsonl' (looked for in the spec's folder "
        f"{spec_dir}, then in the current directory {here}); fix the path, or give a hub dataset id as org/name\n")
    shutil.copy(world / "attack.jsonl", here / "data" / "harmful_train.jsonl")   # the current directory's
    assert main(["validate", str(spec_dir / "s.yaml")]) == 0, capsys.readouterr().err
    (here / "data" / "harmful_train.jsonl").unlink()
    shutil.copy(world / "attack.jsonl", spec_dir / "data" / "harmful_train.jsonl")   # the spec's
    assert main(["validate", str(spec_dir / "s.yaml")]) == 0, capsys.readouterr().err


def test_report_in_an_empty_folder_leaves_it_empty(tmp_path, capsys, monkeypatch):
    """`report` only reads: with the default URI (sqlite:///mlflow.db) and no store here, it says
    so and writes nothing (no mlflow.db, no mlruns/, no reports/, no .attack-sweep/)."""
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--experiment", "no-such-sweep"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --tracking-uri sqlite:///mlflow.db: no such store ({tmp_path / 'mlflow.db'}); run a sweep "
                   "first, or point --tracking-uri at its store\n")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_file_is_a_new_store_for_a_sweep(tmp_path):
    """A 0-byte file (`touch mlflow.db`) is what SQLite reads as a new database: a command that
    writes may start its store there (MLflow does), a report finds no store in it until then."""
    from mlflow.tracking import MlflowClient

    from orchestrator.spec import SpecError
    from orchestrator.spec.preflight import check_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mlflow.db").write_bytes(b"")
    check_tracking(uri)
    with pytest.raises(SpecError, match="is an empty database"):
        check_tracking(uri, creates=False)
    MlflowClient(uri).create_experiment("a-sweep")   # MLflow starts its store in the empty file
    check_tracking(uri, creates=False)
    assert MlflowClient(uri).get_experiment_by_name("a-sweep") is not None


def test_the_store_check_reads_only_and_waits_out_a_writer(tmp_path):
    """The header and table read leave an MLflow store as it was (no journal, same bytes), and a
    store another process holds locked (a sweep committing) is let through, not called damaged."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from orchestrator.spec.preflight import check_tracking

    path = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    check_tracking(f"sqlite:///{path}", creates=False)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before and sorted(tmp_path.iterdir()) == [path]
    writer = sqlite3.connect(path)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        check_tracking(f"sqlite:///{path}", creates=False)   # waits its 5 s, then leaves it to MLflow
    finally:
        writer.rollback()
        writer.close()
