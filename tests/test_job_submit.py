"""`ray job submit` end to end: a real head (`ray start --head` on 127.0.0.1, token authentication
on), a small sweep submitted as a job with the CLI users run, the job's report and MLflow records,
then the head stopped and gone.

Token authentication in Ray 2.60 (read from the installed source):
- The mode comes from the environment only: RAY_AUTH_MODE=token | disabled
  (ray/_private/authentication/authentication_token_setup.py; `_system_config` may not set it).
- The token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (the C++
  AuthenticationTokenLoader; `ray get-auth-token [--generate]` prints or creates the last).
- With RAY_AUTH_MODE unset, `ray start --head` turns token auth on iff a token is found there
  (scripts.py, `maybe_enable_token_auth_if_token_available`), and a local `ray.init()` always turns
  it on, writing ~/.ray/auth_token if missing (worker.py, `enable_token_auth_by_default`): once any
  local sweep has run, a later `ray start --head` on that machine requires the token.
- The dashboard, and with it the job REST API, answers 401 without an `Authorization: Bearer TOKEN`
  header and 403 with a wrong one (http_token_authentication.py). `ray job submit` and
  JobSubmissionClient send the header only when token auth is on in *their own* process,
  RAY_AUTH_MODE=token (a token file alone is not enough; a local ray.init() sets the variable)
  (dashboard_sdk.py, `get_auth_headers_if_auth_enabled`); else pass
  `--headers '{"Authorization": "Bearer TOKEN"}'` or RAY_JOB_HEADERS.
- The job's driver inherits the head's environment, so its `ray.init(address="auto")` finds the mode
  and the token without help.

`ray stop` is not used to stop the head: it kills every Ray process on the machine (a scan by
process name, scripts.py `stop`), which would take down the in-process Ray of other tests and any
other cluster here. The head runs as `ray start --head --block` instead; SIGTERM to that process
stops exactly the processes of this node, as `ray stop` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

import psutil
import pytest
import torch
import yaml
from conftest import sweep_dict, trial_runs

from orchestrator import spec as S
from orchestrator import sweep
from trainables import run_attack

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 300


def _free_ports(n: int) -> list[int]:
    """n ports free now, below the kernel's ephemeral range (outgoing connections, and Ray's own
    port-0 binds, draw from that range and could take a port before the head binds it) and above
    Ray's worker ports (10002-19999)."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    ports: list[int] = []
    for port in random.sample(range(20000, max(lo, 20000 + 4 * n)), 4 * n):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError("no free ports")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's variables (pytest's own ray.init sets RAY_AUTH_MODE, a
    stray RAY_ADDRESS would redirect the CLI), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _http(url: str, token: str | None = None) -> tuple[int, str]:
    """GET url (with a bearer token); (status, body), status 0 when nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


class Head:
    """A Ray head of its own: own ports, own short temp dir (Ray's socket paths must stay
    under ~107 characters). `auth="token"`: token authentication on, with a fresh token in a
    file named by RAY_AUTH_TOKEN_PATH. `auth="unset"`: RAY_AUTH_MODE unset, HOME an empty temp
    dir, holding ~/.ray/auth_token only if `home_token`."""

    def __init__(self, auth: Literal["token", "unset"] = "token", home_token: bool = False) -> None:
        self.temp = tempfile.mkdtemp(prefix="rayj", dir="/tmp")
        self.token = secrets.token_hex(32)
        token_file = Path(self.temp) / ("home/.ray/auth_token" if auth == "unset" else "auth_token")
        token_file.parent.mkdir(parents=True, exist_ok=True)
        if auth == "token" or home_token:
            token_file.write_text(self.token)
        # auth="token" is what a user's shell holds on a token-protected cluster: `ray` commands
        # run with it authenticate; the job's driver inherits it from the head.
        self.env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)) if auth == "token" \
            else _clean_env(HOME=str(Path(self.temp) / "home"))
        # SIGTERM first drains the node, for Serve replicas (node.py `_drain_node_before_shutdown`), and
        # that at times waits out its whole 30 s; there is nothing to drain here.
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        self.log = Path(self.temp) / "head.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, attempts: int = 3) -> None:
        """`ray start --head --block` in the background; returns once the job API answers.
        A port taken between choosing and binding it means another try on other ports."""
        for attempt in range(attempts):
            gcs, dash, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
            self.url = f"http://127.0.0.1:{dash}"
            cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                   # every fixed default port (10001, 52365, ...) moved, so no other cluster here clashes
                   "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
                   "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
                   "--runtime-env-agent-port", str(env_agent),
                   "--num-cpus", "2", "--object-store-memory", str(200 * 2**20), "--disable-usage-stats",
                   "--temp-dir", str(Path(self.temp) / "t")]
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            deadline = time.time() + START_TIMEOUT_S
            while _http(f"{self.url}/api/jobs/", self.token)[0] != 200:
                if self.proc.poll() is not None:
                    break
                assert time.time() < deadline, f"dashboard not up in {START_TIMEOUT_S} s:\n{self.logs()}"
                time.sleep(0.5)
            else:
                return
            self.stop()
            taken = "already occupied" in self.logs() or "in use" in self.logs()
            assert taken and attempt + 1 < attempts, f"ray start exited {self.proc.returncode}:\n{self.logs()}"

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        return subprocess.run([RAY, *args], env=self.env if env is None else env, capture_output=True,
                              text=True, timeout=timeout)

    def logs(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to `ray start --block`: it kills its node's processes and exits. Then anything
        still running in this head's temp dir (a driver in its working dir, a stuck worker) is
        killed too; other Ray clusters on the machine are left alone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for p in psutil.process_iter(["cmdline", "cwd"]):
            if p.pid != os.getpid() and self.owns(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()

    def owns(self, p: psutil.Process) -> bool:
        inside = self.temp + os.sep
        return (p.info["cwd"] or "").startswith(inside) or any(inside in a for a in p.info["cmdline"] or [])

    def remove(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def head():
    h = Head()
    try:
        h.start()
        yield h
    finally:
        h.stop()
        h.remove()


def _wait_job(head: Head, job_id: str) -> str:
    deadline = time.time() + JOB_TIMEOUT_S
    status = "never answered"
    while time.time() < deadline:
        code, body = _http(f"{head.url}/api/jobs/{job_id}", head.token)
        status = json.loads(body)["status"] if code == 200 else status
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    head.ray("job", "stop", "--address", head.url, job_id)
    return f"timed out after {JOB_TIMEOUT_S} s ({status})"


def test_sweep_submitted_as_a_ray_job_to_a_token_protected_head(world, head, tmp_path):
    raw = sweep_dict(world, "job-submit", max_steps=10, eval_every=5,
                     space={"dataset_size": 16, "learning_rate": {"grid": [1e-4, 3e-3]}})
    raw["data"]["eval_size"] = 8
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "spec.yaml").write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    entrypoint = [sys.executable, "-m", "orchestrator.cli", "run", "spec.yaml", "--address", "auto",
                  "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
                  "--out", str(tmp_path / "report")]
    runtime_env = {"env_vars": {"ATTACK_SWEEP_CACHE": os.environ["ATTACK_SWEEP_CACHE"],
                                "MLFLOW_DISABLE_TELEMETRY": "true"}}
    submit = ["job", "submit", "--address", head.url, "--working-dir", str(job_dir),
              "--runtime-env-json", json.dumps(runtime_env), "--no-wait"]

    # Without the token nothing gets in: the REST API refuses, and so does `ray job submit`
    # from a shell that lacks RAY_AUTH_MODE=token.
    assert _http(f"{head.url}/api/jobs/")[0] == 401
    assert _http(f"{head.url}/api/jobs/", "not-the-token")[0] == 403
    refused = head.ray(*submit, "--submission-id", "refused", "--", *entrypoint, env=_clean_env())
    assert refused.returncode != 0 and "Authentication required" in refused.stderr, refused.stderr[-2000:]

    done = head.ray(*submit, "--submission-id", "sweep", "--", *entrypoint)
    assert done.returncode == 0, done.stderr[-2000:]
    status = _wait_job(head, "sweep")
    logs = json.loads(_http(f"{head.url}/api/jobs/sweep/logs", head.token)[1])["logs"]
    assert status == "SUCCEEDED", f"{status}\n{logs[-6000:]}\n{head.logs()}"
    jobs = json.loads(_http(f"{head.url}/api/jobs/", head.token)[1])
    assert [j["submission_id"] for j in jobs] == ["sweep"]  # the refused one never ran

    assert "sweep 'job-submit': 2 defences x 2 attackers" in logs
    # the run ends in its summary: each defence's worst case, where the report is, the MLflow link
    ending = logs[logs.index("Worst case per defence (steps"):].strip().splitlines()
    assert len(ending) <= 30 and ending[-1].startswith("open the report: file://"), ending
    assert ending[1].startswith("  base (reference)  ") and ending[2].startswith("  rescaled          ")
    assert "every table: attack-sweep report --experiment job-submit --tracking-uri" in logs
    assert "(base)" not in logs and "per attacker" not in logs   # the full tables are the report's
    assert (tmp_path / "report" / "report.csv").exists()

    sweeps = trial_runs(uri, "job-submit", kind="sweep")
    trials = trial_runs(uri, "job-submit")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert len(trials) == 4 and len({r.data.tags["trial_key"] for r in trials}) == 4
    # what the job recorded is what the attack gives run in this process, outside Ray: the same status
    # and budget for each (defence, attacker)
    spec = S.from_dict(raw)
    torch.set_num_threads(1)  # a 1-CPU Ray trial runs one thread
    for t in sweep.trials(spec):
        (r,) = [r for r in trials if r.data.tags["trial_key"] == sweep.trial_key(spec, t)]
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id
        direct = run_attack(sweep.attack_config(spec, t))
        assert r.data.tags["status"] == direct.status, (t, r.data.tags, logs[-4000:])
        btf = direct.budget_to_failure
        assert r.data.metrics.get("budget_to_failure_steps") == (btf.step if btf else None), t
    assert any(r.data.tags["status"] == "failed" for r in trials)   # premise: some budget was compared

    head.stop()
    assert head.proc.returncode is not None
    assert _http(f"{head.url}/api/version")[0] == 0  # nothing answers on the dashboard port
    left = [p.pid for p in psutil.process_iter(["cmdline", "cwd"]) if head.owns(p)]
    assert not left, left


@pytest.mark.parametrize("home_token", [False, True], ids=["no-token", "token-in-home"])
def test_ray_start_turns_token_auth_on_iff_it_finds_a_token(home_token):
    """RAY_AUTH_MODE unset (a plain `ray start --head`): auth is off on a machine without a
    token and on where ~/.ray/auth_token exists, e.g. after any local `attack-sweep run`."""
    h = Head(auth="unset", home_token=home_token)
    try:
        h.start()
        assert _http(f"{h.url}/api/jobs/")[0] == (401 if home_token else 200), h.logs()
    finally:
        h.stop()
        h.remove()
