"""Capability measured with EleutherAI's lm-evaluation-harness, on a model already in memory."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from trainables.attacker import Strict as _Strict

#: lm-eval's own default seeds (simple_evaluate): python random, numpy, torch, few-shot sampler
_SEEDS = (0, 1234, 1234, 1234)


class LmEval(_Strict):
    """lm-evaluation-harness tasks scored on a model in memory (multiple-choice loglikelihood
    tasks need no generation; local task YAMLs work offline)."""

    tasks: list[str] = Field(min_length=1)
    """lm-eval task (or group) names: ones defined in include_path, or lm-eval's own."""
    include_path: str | None = None
    """Folder of local task YAMLs, searched as well as lm-eval's own tasks (a relative path is
    resolved by the caller, against the spec's folder)."""
    limit: int | None = Field(None, gt=0)
    """Score only the first `limit` examples of each task (all if null)."""
    batch_size: int = Field(8, gt=0)
    """Loglikelihood requests per forward pass."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples in each prompt (null: each task's own default, else 0)."""
    tolerance: float = Field(0.05, ge=0)
    """Largest drop of each task's main metric (acc_norm, else acc, else its first) below the
    base model's that still counts as stable."""


def missing() -> str | None:
    """One line saying how to install lm-eval when it is not importable, else None."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "lm-eval tasks need the lm-eval package: pip install 'attack-sweep[lm-eval]'"
    return None


def _require() -> None:
    if (msg := missing()) is not None:
        raise ImportError(msg)


# ---------------------------------------------------------------------------------- task names

def _index(include_path: str | None, defaults: bool) -> set[str]:
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=include_path, include_defaults=defaults).all_tasks)


def _folder(include_path: str | None) -> str | None:
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"lm_eval.include_path: {include_path} is not a folder")
    return include_path


def check_tasks(cfg: LmEval) -> None:
    """Raise ValueError (one line, naming the task) when a task is unknown to lm-eval with
    cfg.include_path, or when include_path is not a folder. Names found in include_path are
    checked in well under a second; a name that is not there costs one index of lm-eval's own
    ~15,000 task files (about 5 s)."""
    _require()
    where = _folder(cfg.include_path)
    local = _index(where, defaults=False) if where else set()
    rest = [t for t in cfg.tasks if t not in local]
    if not rest:
        return
    known = _index(where, defaults=True)
    for task in rest:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
            scope = f"in include_path {where} or lm-eval's own tasks" if where else "in lm-eval's own tasks"
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(f"lm_eval.tasks: no task {task!r} {scope}{hint}")


def _task_manager(cfg: LmEval):
    """A TaskManager over include_path alone when it defines every task asked for as a plain task
    (no 5 s index of lm-eval's own tasks), else over both: a local group may name lm-eval's tasks."""
    from lm_eval.tasks import TaskManager

    where = _folder(cfg.include_path)
    if where:
        local = TaskManager(include_path=where, include_defaults=False)
        if set(cfg.tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=where)


# ---------------------------------------------------------------------------------- scoring

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' logging and progress bars off, restored afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = not are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            enable_progress_bars()


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Seed python, numpy and torch as lm-eval does; put the caller's RNG states back after."""
    import numpy as np
    import torch

    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        random.seed(_SEEDS[0])
        np.random.seed(_SEEDS[1])
        torch.manual_seed(_SEEDS[2])
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


@contextlib.contextmanager
def _kept(model, device) -> Iterator[Any]:
    """Evaluate the model (on `device` if given, moved back afterwards), every module's
    train/eval mode restored."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    home = next(iter(model.parameters())).device
    target = home if device is None or device == "auto" else torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    moved = target != home
    try:
        if moved:
            model.to(target)
        with torch.no_grad():
            yield model
    finally:
        if moved:
            model.to(home)
        for m, training in modes:
            m.training = training


def _hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    class _QuietHFLM(HFLM):  # lm-eval's request loops draw a progress bar unless told not to
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    # lm-eval gives a tokenizer without a pad token one (possibly a new vocabulary entry): work on a copy
    if tokenizer.pad_token_id is None:
        import copy

        tokenizer = copy.deepcopy(tokenizer)
    return _QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _configure(tasks: dict[str, Any], num_fewshot: int | None) -> None:
    """What lm_eval.simple_evaluate does to loaded tasks: few-shot count and few-shot seed."""
    for task in tasks.values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:  # a task that pins 0 shots keeps them
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=_SEEDS[3])


def _flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"task/metric": value} from lm-eval's {"task": {"metric,filter": value}}; a filter other
    than "none" is appended ("gsm8k/exact_match/strict-match"). No commas: MLflow-safe names."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
            out[name] = float(value)
    return out


def scores(model, tokenizer, cfg: LmEval, device: Any = None) -> dict[str, float]:
    """Score `model` (a transformers causal LM in memory) on cfg.tasks with lm-eval's HFLM:
    {"<task>/<metric>": value} for each task's (and group's) numeric metrics, stderr left out.

    Deterministic (lm-eval's seeds, under a forked RNG: the caller's random/numpy/torch states
    are put back) and quiet (lm-eval's logger at ERROR, datasets' and the request loops' bars
    off; lm-eval still draws one bar per task while it builds requests, which has no switch).
    Leaves the model as found: every module's train/eval mode restored; with `device` (str or
    torch.device; None or "auto": where the model lies) the model is moved there for the run
    and back after. The tokenizer is not changed (it is copied first if it lacks a pad token,
    which lm-eval would add). Tasks are run as their YAML says: no chat template is applied,
    so a chat model's task should hold chat-formatted questions (see `write_task`)."""
    _require()
    import lm_eval

    with _quiet(), _kept(model, device) as m, _seeded():  # moved first: a CUDA RNG is then forked too
        task_manager = _task_manager(cfg)
        loaded = task_manager.load(list(cfg.tasks))
        _configure(loaded["tasks"], cfg.num_fewshot)
        lm = _hflm(m, tokenizer, cfg.batch_size)
        out = lm_eval.evaluate(lm=lm, task_dict=loaded, limit=cfg.limit, log_samples=False,
                               bootstrap_iters=0, write_out=False)
    return _flatten(out["results"])


def main_metric(task_scores: dict[str, float], task: str) -> tuple[str, float]:
    """The metric a stability verdict compares for `task`: acc_norm if scored, else acc, else the
    task's first metric (in `scores`' order). Raises KeyError when the task has no scores."""
    prefix = f"{task}/"
    mine = {k[len(prefix):]: v for k, v in task_scores.items() if k.startswith(prefix)}
    for name in ("acc_norm", "acc"):
        if name in mine:
            return name, mine[name]
    if not mine:
        raise KeyError(f"no scores for lm-eval task {task!r} (have: {', '.join(sorted(task_scores)) or 'none'})")
    name = next(iter(mine))
    return name, mine[name]


# ---------------------------------------------------------------------------------- local tasks

def write_task(folder: str | Path, name: str, rows: Iterable[dict[str, Any]], *,
               target_delimiter: str = " ", description: str = "") -> Path:
    """Write a local multiple-choice task `name` into `folder` (created if needed):
    <name>.jsonl with the rows and <name>.yaml pointing at it by absolute path. Each row is
    {"question": str, "choices": [str, ...], "answer": index of the right choice}. lm-eval
    scores each choice by its loglikelihood after question + target_delimiter: metrics acc and
    acc_norm (normalised by the choice's length in bytes). Returns the YAML's path."""
    import yaml

    folder = Path(folder).resolve()
    rows = list(rows)
    if not rows:
        raise ValueError(f"write_task {name!r}: no rows")
    for i, r in enumerate(rows):
        choices, answer = r.get("choices"), r.get("answer")
        if not isinstance(r.get("question"), str) or not isinstance(choices, list) or not choices \
                or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"write_task {name!r}: row {i} needs a question (str) and choices (list of str)")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"write_task {name!r}: row {i} answer {answer!r} is not an index into its choices")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w") as fh:
        fh.writelines(json.dumps({k: r[k] for k in ("question", "choices", "answer")}) + "\n" for r in rows)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "question",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": target_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    if description:
        config["description"] = description
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
