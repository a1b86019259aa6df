"""Shared fixtures: the toy world built once per session in a temp cache, and a local Ray."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# a local ray.init() turns Ray's token auth on and writes ~/.ray/auth_token unless told not to;
# the tests' own local clusters need no auth (test_job_submit.py starts its head with a token)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The embedded toy world (tokenizer, aligned base, rescaled defence, splits), built
    with save_pretrained so tests load it through the real from_pretrained path."""
    from orchestrator.spec import toyworld

    cache = tmp_path_factory.mktemp("cache")
    os.environ["ATTACK_SWEEP_CACHE"] = str(cache)
    with torch_threads(1):  # a 2-layer model: one thread is as fast, and immune to a busy machine
        return toyworld.build(verbose=False)


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not thrash when the suite shares its cores
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in a module)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def attack_dict(world, **over) -> dict:
    """A small AttackConfig dict against the toy base model."""
    cfg = {
        "checkpoint": {"model": str(world / "base")},
        "data": {"attack": {"source": str(world / "attack.jsonl")},
                 "eval": {"source": str(world / "eval.jsonl")}, "chat_template": True,
                 "eval_size": 8},
        "evaluator": {"name": "refusal_keyword", "options": {"max_new_tokens": 4}},
        "attacker": {"learning_rate": 1e-4, "dataset_size": 16, "batch_size": 4},
        "phi": 0.5, "eval_every": 2, "max_steps": 6, "device": "cpu",
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def sweep_dict(world, name: str, defences=("base", "rescaled"), **over) -> dict:
    """A small sweep spec dict over the toy world; the first defence named is the base."""
    raw = {
        "name": name,
        "defences": [{"name": d, "model": str(world / d), "base": i == 0} for i, d in enumerate(defences)],
        "data": {"attack": {"source": str(world / "attack.jsonl")},
                 "eval": {"source": str(world / "eval.jsonl")},
                 "benign": {"source": str(world / "benign.jsonl")}, "chat_template": True,
                 "eval_size": 16},
        "evaluator": {"name": "refusal_keyword", "options": {"max_new_tokens": 4}},
        "phi": 0.5, "eval_every": 5, "max_steps": 20, "device": "cpu",
        "space": {"dataset_size": 32},
    }
    raw.update(over)
    return raw


def e2e_spec(world, name: str = "e2e", **over):
    """The end-to-end sweep: the toy base and its rescaled defence, each against two learning
    rates (1e-4 resists or breaks late, 3e-3 breaks both), T 20, evaluated every 5 steps."""
    from orchestrator import spec as S

    raw = {
        "name": name,
        "defences": [{"name": "base", "model": str(world / "base"), "base": True},
                     {"name": "rescaled", "model": str(world / "rescaled")}],
        "data": {"attack": {"source": str(world / "attack.jsonl")},
                 "eval": {"source": str(world / "eval.jsonl")}, "chat_template": True,
                 "eval_size": 16},
        "evaluator": {"name": "refusal_keyword", "options": {"max_new_tokens": 4}},
        "phi": 0.5, "eval_every": 5, "max_steps": 20, "device": "cpu",
        "space": {"learning_rate": {"grid": [1e-4, 3e-3]}, "dataset_size": 32},
    }
    raw.update(over)
    return S.from_dict({k: v for k, v in raw.items() if v is not None})


@pytest.fixture(scope="session")
def e2e_sweep(world, ray_local, tmp_path_factory):
    """e2e_spec swept once for the whole session (a real sweep costs ~30 s on 2 cores, so modules
    share it): (spec, tracking URI, its folder, the lines the sweep printed). test_sweep.py's
    rerun test adds trials to it; every other user only reads it."""
    from orchestrator import sweep

    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp}/mlflow.db"
    spec = e2e_spec(world)
    lines: list[str] = []
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lines.append)
    return spec, uri, tmp, lines


def trial_runs(uri: str, experiment: str, kind: str = "trial") -> list:
    """The MLflow runs of one kind (trial, sweep, adversary) in a sweep's experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")
