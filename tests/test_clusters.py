"""clusters/ checked offline, with the installed tools' own validators: no cloud, no cluster, no network.

    .venv/bin/pytest -q tests/test_clusters.py

- Cluster launcher configs (aws.yaml, gcp.yaml): Ray's own `prepare_config` + `validate_config`
  (ray-schema.json through jsonschema), node resources against the instance types' real CPUs and GPUs,
  the `ray start` commands through Ray's own click parser.
- KubeRay manifests: versions, GPU requests, images and the RayJob's entrypoint, which is run through
  `sh` and then attack-sweep's own argument parser.
- runtime_env.yaml: Ray's `RuntimeEnv`, and Ray's own packaging of a working directory with its excludes.
- DeepSpeed configs: DeepSpeed's own `DeepSpeedZeroConfig` and a full `DeepSpeedConfig` with the keys
  the trainer fills in.
- README.md: its commands through the `ray job submit`, `attack-sweep` and `mlflow server` parsers, and
  the token-authentication behaviour it documents, against the installed Ray.

A new file under clusters/ must be added to CHECKED (and checked): test_every_file_is_checked fails
otherwise.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml

from trainables.config import DEEPSPEED_OWNED_KEYS  # a ZeRO file that sets any of these is wrong

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"

LAUNCHER = ("aws.yaml", "gcp.yaml")
KUBERAY = {"kuberay/raycluster.yaml": "RayCluster", "kuberay/rayjob.yaml": "RayJob"}
ZERO_STAGE = {"zero0.json": 0, "zero1.json": 1, "zero2.json": 2, "zero3.json": 3,
              "zero2_offload.json": 2, "zero3_offload.json": 3}
CHECKED = {*LAUNCHER, *KUBERAY, "runtime_env.yaml", "Dockerfile", "README.md", "deepspeed/README.md",
           *(f"deepspeed/{name}" for name in ZERO_STAGE)}

RAY_VERSION = ray.__version__
TORCH_VERSION = torch.__version__.split("+")[0]  # 2.13.0+cpu here; the clusters pin the CUDA build
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"

# vCPUs and GPUs of the machine types the launcher configs use (AWS and GCP documentation);
# resources must advertise exactly these (with CPU 0 on the head, which keeps trials off it).
MACHINES = {
    "m5.2xlarge": (8, 0), "g5.12xlarge": (48, 4), "p4d.24xlarge": (96, 8),
    "n2-standard-8": (8, 0), "g2-standard-48": (48, 4), "a2-highgpu-8g": (96, 8), "n1-standard-32": (32, 0),
}


def load(rel: str) -> Any:
    text = (CLUSTERS / rel).read_text()
    return json.loads(text) if rel.endswith(".json") else yaml.safe_load(text)


def cluster_spec(rel: str) -> dict:
    doc = load(rel)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def shell_steps(command: str) -> list[str]:
    return [step.strip() for step in command.split(";") if step.strip()]


def exports(command: str) -> dict[str, str]:
    out = {}
    for step in shell_steps(command):
        if step.startswith("export "):
            out.update(kv.split("=", 1) for kv in shlex.split(step)[1:])
    return out


def ray_start(command: str) -> dict:
    """The options `ray start` would run with, parsed by Ray's own CLI (unknown flags fail)."""
    from ray.scripts.scripts import start

    step = next(s for s in shell_steps(command) if s.startswith("ray start"))
    return start.make_context("start", shlex.split(step)[2:]).params


# --- every file is checked --------------------------------------------------------------------------


def test_every_file_is_checked():
    on_disk = {p.relative_to(CLUSTERS).as_posix() for p in CLUSTERS.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk - CHECKED == set(), "files under clusters/ that no test checks: add them to CHECKED"
    assert CHECKED - on_disk == set(), "CHECKED names files that are gone"


@pytest.mark.parametrize("rel", sorted(p for p in CHECKED if p.endswith((".yaml", ".json"))))
def test_parses_to_a_mapping(rel):
    assert isinstance(load(rel), dict) and load(rel)


# --- cluster launcher configs -----------------------------------------------------------------------


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_config_passes_rays_validation(rel):
    """What `ray up` does before it talks to the cloud: fill the provider's defaults, then validate
    against ray/autoscaler/ray-schema.json and Ray's own cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(rel)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_validation_rejects_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load("aws.yaml")
    broken["available_node_types"]["gpu_a10g_x4"]["resources"]["GPU"] = "4"  # a string, not a count
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_node_types(rel):
    cfg = load(rel)
    assert cfg["cluster_name"] and cfg["provider"]["type"] == rel.removesuffix(".yaml")
    assert cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs the driver only"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values())
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_resources_match_the_machines(rel):
    cfg = load(rel)
    for name, t in cfg["available_node_types"].items():
        node = t["node_config"]
        machine = node.get("InstanceType") or node["machineType"]
        assert machine in MACHINES, f"{name}: add {machine}'s vCPUs and GPUs to MACHINES"
        cpus, gpus_ = MACHINES[machine]
        gpus_ += sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
        if name == cfg["head_node_type"]:
            assert gpus_ == 0, "a CPU head"
            continue
        assert t["resources"] == {"CPU": cpus, "GPU": gpus_}, name


def test_gcp_gpu_nodes_stop_on_maintenance():
    """GPU VMs cannot live-migrate: scheduling.onHostMaintenance TERMINATE, an object as the
    Compute API defines it (Ray's own examples have it as a list: ray-project/ray#46248)."""
    cfg = load("gcp.yaml")
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")}
    assert len(gpu_types) >= 2
    for name, t in gpu_types.items():
        node = t["node_config"]
        assert node["scheduling"] == {"onHostMaintenance": "TERMINATE"}, name
        # A2/G2 come with their GPUs; N1 gets them from guestAccelerators.
        assert bool(node.get("guestAccelerators")) == node["machineType"].startswith("n1-"), name
        assert any("nvidia-smi" in c for c in t["initialization_commands"]), name


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_installs_the_pinned_stack(rel):
    cfg = load(rel)
    assert cfg["docker"]["image"] == RAY_IMAGE
    setup = cfg["setup_commands"]
    torch_at = setup.index(f"pip install -q torch=={TORCH_VERSION}")
    project_at = next(i for i, c in enumerate(setup) if c.startswith("pip install") and "attack-sweep" in c)
    assert torch_at < project_at, "torch first, then the project"
    assert cfg["file_mounts"]["~/attack-sweep"] == "."
    assert {".venv", ".git", "mlruns", "mlflow.db", "reports", ".attack-sweep"} <= set(cfg["rsync_exclude"])


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_start_commands(rel):
    """Parsed by `ray start`'s own options: a misspelt flag fails here, not on a fresh head."""
    cfg = load(rel)
    head_cmd, worker_cmd = cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]
    head, worker = ray_start(head_cmd), ray_start(worker_cmd)
    assert head["head"] and head["dashboard_host"] == "127.0.0.1"
    assert worker["address"] == "$RAY_HEAD_IP:6379" and not worker["head"]
    # Token auth comes from the environment only, on every node; the token file travels with file_mounts.
    assert exports(head_cmd)["RAY_AUTH_MODE"] == exports(worker_cmd)["RAY_AUTH_MODE"] == "token"
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert exports(head_cmd)["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(exports(head_cmd)["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30


# --- KubeRay -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", sorted(KUBERAY))
def test_kuberay_manifest(rel):
    doc = load(rel)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[rel]
    spec = cluster_spec(rel)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the driver only"
    assert all(gpus(c) == 0 for c in head["template"]["spec"]["containers"])
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(gpus(c) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for g in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's CRD types rayStartParams as map[string]string: a bare 0 is rejected.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = g["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        for c in pod["containers"]:
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], "NCCL needs /dev/shm"
    for c in containers(spec):
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
        assert c["image"].endswith(f"-ray{RAY_VERSION}-py311-gpu"), c["image"]


def test_kuberay_cluster_and_job_agree():
    cluster, job = cluster_spec("kuberay/raycluster.yaml"), cluster_spec("kuberay/rayjob.yaml")
    images = {c["image"] for spec in (cluster, job) for c in containers(spec)}
    submitter = load("kuberay/rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert len(images | {c["image"] for c in submitter}) == 1
    for key in ("rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions"):
        assert cluster[key] == job[key], key
    assert [g["template"]["spec"]["containers"][0]["resources"] for g in cluster["workerGroupSpecs"]] == \
        [g["template"]["spec"]["containers"][0]["resources"] for g in job["workerGroupSpecs"]]


def _entrypoint_argv(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The RayJob's entrypoint as the shell on the head (or the submitter) expands it."""
    entrypoint = load("kuberay/rayjob.yaml")["spec"]["entrypoint"]
    return subprocess.run(["sh", "-c", f"printf '%s\\n' {entrypoint}"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def test_rayjob_entrypoint_runs_attack_sweep():
    from orchestrator.cli import build_parser

    job = load("kuberay/rayjob.yaml")["spec"]
    assert "attack-sweep run" in job["entrypoint"] and "$" in job["entrypoint"]
    done = _entrypoint_argv({"MLFLOW_TRACKING_URI": "http://mlflow.test:5000"})
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[:2] == ["attack-sweep", "run"]
    args = build_parser().parse_args(argv[1:])
    assert (ROOT / args.spec).is_file()  # the image copies search_spaces/ into the working_dir
    assert args.address == "auto"
    assert args.tracking_uri == "http://mlflow.test:5000"
    assert args.storage_path.startswith("s3://")
    assert job["shutdownAfterJobFinishes"] is True


def test_rayjob_fails_loudly_without_the_tracking_uri():
    """Without the Secret the job must stop, not record into a sqlite file that dies with the head."""
    done = _entrypoint_argv({})
    assert done.returncode != 0
    assert "attack-sweep-mlflow" in done.stderr


def test_rayjob_takes_the_tracking_uri_from_a_secret():
    job = load("kuberay/rayjob.yaml")["spec"]
    (submitter,) = job["submitterPodTemplate"]["spec"]["containers"]
    uri = next(e for e in submitter["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    assert uri["valueFrom"]["secretKeyRef"] == {"name": "attack-sweep-mlflow", "key": "MLFLOW_TRACKING_URI"}
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "attack-sweep-mlflow"}} in head["envFrom"]
    assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_rayjob_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    assert env["working_dir"] == "/home/ray/attack-sweep"
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # that path is the image's copy of this checkout
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert f"WORKDIR {env['working_dir']}" in dockerfile


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                    # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"hf_[A-Za-z0-9]{30,}"),                 # Hugging Face token
    re.compile(r"(?i)(password|passwd|secret|token)\w*\s*[:=]\s*['\"]?[A-Za-z0-9/+_.\-]{12,}"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),              # credentials in a URI
]


def find_secrets(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_secret_finder_finds_secrets():
    for planted in ("AKIAABCDEFGHIJKLMNOP", "password: hunter2hunter2", "HF_TOKEN=hf_" + "a" * 34,
                    "postgresql://mlflow:s3cret@db:5432/mlflow", "RAY_AUTH_TOKEN=0123456789abcdef"):
        assert find_secrets(planted), planted


@pytest.mark.parametrize("rel", sorted(CHECKED))
def test_no_literal_secrets(rel):
    assert find_secrets((CLUSTERS / rel).read_text()) == []


def test_rayjob_holds_no_secret():
    text = (CLUSTERS / "kuberay/rayjob.yaml").read_text().lower()
    for marker in ("password", "akia", "token="):
        assert marker not in text


# --- runtime_env.yaml --------------------------------------------------------------------------------


def test_runtime_env_as_ray_job_submit_reads_it():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(CLUSTERS / "runtime_env.yaml"), working_dir=".")
    assert set(env) <= RuntimeEnv.known_fields  # RuntimeEnv itself takes unknown keys as plugins
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert not {"pip", "conda", "uv"} & set(env), "the nodes have the dependencies; no per-job install"
    secretish = re.compile(r"(?i)password|secret|token$|_key$|credential")
    assert not [k for k in env.get("env_vars", {}) if secretish.search(k)]


def _package(root: Path, excludes: list[str], tmp_path: Path, include_gitignore: bool) -> set[str]:
    """The files Ray would upload as the job's working_dir (Ray's own packaging)."""
    from ray._private.runtime_env.packaging import create_package

    out = tmp_path / "package.zip"
    create_package(str(root), out, include_gitignore=include_gitignore, excludes=excludes)
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_runtime_env_excludes_keep_heavy_and_local_state_out(tmp_path):
    src = tmp_path / "repo"
    keep = ["pyproject.toml", "orchestrator/cli.py", "search_spaces/adaptive_tpe.yaml", "data/train.jsonl"]
    drop = [".venv/lib/torch.so", ".git/HEAD", "mlruns/0/meta.yaml", "mlartifacts/a", "mlflow.db",
            "reports/x/report.md", ".attack-sweep/ray_results/s.json", "orchestrator/__pycache__/cli.pyc",
            "attack_sweep.egg-info/PKG-INFO", ".pytest_cache/v", ".ruff_cache/c", "build/lib/x.py",
            "dist/a.whl"]
    for rel in keep + drop:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    excludes = load("runtime_env.yaml")["excludes"]
    assert _package(src, excludes, tmp_path, include_gitignore=False) == set(keep)


def test_runtime_env_package_of_this_checkout(tmp_path):
    files = _package(ROOT, load("runtime_env.yaml")["excludes"], tmp_path, include_gitignore=True)
    assert {"pyproject.toml", "orchestrator/cli.py", "trainables/attack.py",
            "search_spaces/adaptive_tpe.yaml", "clusters/runtime_env.yaml"} <= files
    assert not [f for f in files if f.split("/")[0] in {".venv", ".git", "mlruns", "reports", ".attack-sweep"}]
    assert (tmp_path / "package.zip").stat().st_size < 50 * 2**20


# --- DeepSpeed ZeRO configs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_config():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig, DeepSpeedConfig


@pytest.mark.parametrize("name", sorted(ZERO_STAGE))
def test_zero_config_validates_with_deepspeed(name, deepspeed_config):
    zero_cls, _ = deepspeed_config
    cfg = load(f"deepspeed/{name}")
    assert set(cfg) <= {"zero_optimization", "communication_data_type"}, "what the user chooses, only"
    assert not DEEPSPEED_OWNED_KEYS & set(cfg)
    zo = cfg["zero_optimization"]
    zero = zero_cls(**zo)  # extra="forbid": a misspelt key fails
    assert int(zero.stage) == zo["stage"] == ZERO_STAGE[name]
    if zo["stage"] < 3:
        assert not [k for k in zo if k.startswith("stage3_") or k == "offload_param"], "stage-3 only keys"
    offloaded = {k for k in ("offload_optimizer", "offload_param") if k in zo}
    if name.endswith("_offload.json"):
        assert offloaded == ({"offload_optimizer", "offload_param"} if zo["stage"] == 3 else {"offload_optimizer"})
        for k in offloaded:
            assert getattr(zero, k).device == "cpu" and getattr(zero, k).pin_memory is True
    else:
        assert not offloaded


@pytest.mark.parametrize("name", sorted(ZERO_STAGE))
def test_zero_config_with_the_trainers_keys_is_a_deepspeed_config(name, deepspeed_config):
    """The trainer adds batch sizes, precision and clipping from the attacker; the result must be a
    config DeepSpeed accepts whole."""
    _, full_cls = deepspeed_config
    cfg = {**load(f"deepspeed/{name}"), "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
           "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    full = full_cls(cfg)
    assert full.zero_optimization_stage == ZERO_STAGE[name]
    assert full.train_batch_size == 2 * 4  # one process here: micro x accumulation x world size 1


def test_zero_validation_rejects_a_misspelt_key(deepspeed_config):
    zero_cls, _ = deepspeed_config
    with pytest.raises(ValueError, match="overlap_com"):
        zero_cls(stage=2, overlap_com=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_offload_files_only_add_offload(stage):
    plain = load(f"deepspeed/zero{stage}.json")["zero_optimization"]
    offload = load(f"deepspeed/zero{stage}_offload.json")["zero_optimization"]
    assert {k: v for k, v in offload.items() if not k.startswith("offload_")} == plain


def test_deepspeed_readme_covers_files_and_trainer_keys():
    text = (CLUSTERS / "deepspeed/README.md").read_text()
    for name in ZERO_STAGE:
        assert f"`{name}`" in text, name
    for key in DEEPSPEED_OWNED_KEYS:
        assert f"`{key}`" in text, key


# --- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_stack():
    lines = [ln.strip() for ln in (CLUSTERS / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == f"FROM {RAY_IMAGE}"
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if f"torch=={TORCH_VERSION}" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install [^&]* \.(\s|$)", r))
    assert torch_at < project_at, "torch first, then the project"
    for ln in lines:
        if ln.startswith("COPY "):
            for src in [a for a in shlex.split(ln)[1:-1] if not a.startswith("--")]:
                assert (ROOT / src).exists(), f"COPY of a missing path: {src}"


# --- README ------------------------------------------------------------------------------------------


def readme_commands(prefix: str) -> list[str]:
    """Commands in README.md's code blocks that start with `prefix` (continuation lines joined)."""
    text = (CLUSTERS / "README.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    return [ln.split("  #")[0] for b in blocks for ln in b.splitlines() if ln.strip().startswith(prefix)]


def test_readme_names_every_file():
    text = (CLUSTERS / "README.md").read_text()
    for rel in CHECKED - {"README.md"}:
        assert rel in text or rel.startswith("deepspeed/"), rel
    assert "deepspeed/README.md" in text


def test_readme_job_submit_commands_parse():
    """Through `ray job submit`'s own options, then attack-sweep's: the sweep command users copy works."""
    from ray.dashboard.modules.job.cli import submit

    from orchestrator.cli import build_parser

    commands = readme_commands("RAY_AUTH_MODE=token ray job submit") + readme_commands("ray job submit")
    assert len(commands) >= 2
    for command in commands:
        argv = shlex.split(command)
        argv = argv[argv.index("ray") + 3:]
        params = submit.make_context("submit", argv).params
        assert params["address"] == "http://127.0.0.1:8265"
        assert params["working_dir"] == "." and (ROOT / params["runtime_env"]).is_file()
        entrypoint = params["entrypoint"]
        assert entrypoint[:2] == ("attack-sweep", "run")
        args = build_parser().parse_args(entrypoint[1:])
        assert (ROOT / args.spec).is_file()
        assert args.address == "auto"
        assert args.tracking_uri.startswith("http://") and "://" in args.storage_path


def test_readme_mlflow_server_command_parses():
    from mlflow.cli import server

    (command,) = readme_commands("mlflow server")
    params = server.make_context("server", shlex.split(command)[2:]).params
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["artifacts_destination"].startswith("s3://")
    assert params["app_name"] == "basic-auth"
    assert "mlflow.internal" in params["allowed_hosts"].split(",")


# --- Ray token authentication, as README.md documents it ---------------------------------------------

AUTH_PROBE = r"""
import json, os, sys
from ray._private.authentication_test_utils import reset_auth_token_state
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

def headers(**env):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(k, None)
    os.environ.update(env)
    reset_auth_token_state()
    return get_auth_headers_if_auth_enabled({})

path = os.path.join(sys.argv[1], "token")
open(path, "w").write("from-file")
os.makedirs(os.path.join(os.environ["HOME"], ".ray"))
open(os.path.join(os.environ["HOME"], ".ray", "auth_token"), "w").write("from-home")
print(json.dumps({
    "env": headers(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="from-env"),
    "path": headers(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path),
    "home": headers(RAY_AUTH_MODE="token"),
    "no_mode": headers(RAY_AUTH_TOKEN="from-env"),
}))
"""


def test_ray_token_auth_headers_as_documented(tmp_path):
    """The job client sends `authorization: Bearer <token>` only with RAY_AUTH_MODE=token in its own
    environment, the token from RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", AUTH_PROBE, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"env": {"authorization": "Bearer from-env"}, "path": {"authorization": "Bearer from-file"},
                   "home": {"authorization": "Bearer from-home"}, "no_mode": {}}


def test_ray_job_headers_env_var(monkeypatch):
    from ray.dashboard.modules.job.cli import _handle_headers

    monkeypatch.setenv("RAY_JOB_HEADERS", '{"Authorization": "Bearer t"}')
    assert _handle_headers(None) == {"Authorization": "Bearer t"}


def test_readme_documents_the_auth_variables():
    from ray._private.authentication.authentication_constants import RAY_AUTHORIZATION_HEADER_NAME
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    text = (CLUSTERS / "README.md").read_text()
    for name in (AUTH_MODE_ENV_VAR, "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_HEADERS",
                 "ray get-auth-token", "authOptions"):
        assert name in text, name
    assert RAY_AUTHORIZATION_HEADER_NAME.lower() == "x-ray-authorization" and "X-Ray-Authorization" in text
