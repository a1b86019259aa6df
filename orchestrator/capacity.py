"""What one trial (or one run beside the attacks) asks of Ray, against what a cluster can ever give:
refused in one line before a local Ray starts (this machine, counted as Ray counts it) and again
once Ray is up (its nodes, and the autoscaler's node types where Ray reports them)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.cluster import is_local, starts_local
from orchestrator.spec.model import Resources, SpecError

Node = Mapping[str, float]
"""One node's total resources, as Ray names them: {"CPU": 2.0, "GPU": 1.0, ...}."""

DRIVER_CPU = 0.01
"""The CPUs of a multi-worker trial's own process: it only drives its TorchTrainer, whose workers
hold the rest."""

PENDING_TIMEOUT_S = 300.0
"""resources.pending_timeout left unset, on the local Ray a sweep starts itself."""

_EPS = 1e-9


@dataclass(frozen=True)
class Ask:
    """What one trial reserves: `workers` bundles of `cpu` CPUs and `gpu` GPUs, each on one node
    (any node), and with workers > 1 a driver of DRIVER_CPU beside them."""

    cpu: float
    gpu: float = 0.0
    workers: int = 1
    who: str = "trial"

    @classmethod
    def trial(cls, r: Resources) -> Ask:
        return cls(r.cpu, r.gpu, r.workers)

    @classmethod
    def beside(cls, r: Resources) -> Ask:
        """A run beside the attacks (release, benign, diagnostic): one Ray task of one worker's share."""
        return cls(r.cpu, r.gpu, 1, "run beside the attacks")

    @property
    def each(self) -> str:
        return "each worker" if self.workers > 1 else f"each {self.who}"

    def says(self) -> str:
        """'1 CPU', '8 CPUs and 1 GPU': one bundle."""
        return " and ".join(amount(n, unit) for n, unit in ((self.cpu, "CPU"), (self.gpu, "GPU")) if n)

    def fits(self, node: Node, cpu_taken: float = 0.0) -> int:
        """How many of its bundles `node` holds at once (`cpu_taken` already used)."""
        n = math.floor((node.get("CPU", 0.0) - cpu_taken) / self.cpu + _EPS)
        if self.gpu:
            n = min(n, math.floor(node.get("GPU", 0.0) / self.gpu + _EPS))
        return max(n, 0)


@dataclass(frozen=True)
class Shortfall:
    """Why a cluster can never hold one Ask, phrased for the user."""

    field: str
    asks: str
    has: str
    fix: str

    def line(self) -> str:
        return f"{self.field}: {self.asks}, and {self.has}; {self.fix}"


def amount(n: float, unit: str) -> str:
    """'1 CPU', '0.5 CPU', '2 CPUs', '0 GPUs'."""
    return f"{n:g} {unit}" if 0 < n <= 1 else f"{n:g} {unit}s"


def shortfall(ask: Ask, nodes: Sequence[Node], machine: str | None = None) -> Shortfall | None:
    """None where `nodes` can hold one `ask` at once, else why not. `machine` names a single node
    ('this machine'), None a cluster. Each bundle must fit on one node; the workers of a trial may
    spread over nodes, beside its driver."""
    def has(n: float) -> str:
        return f"{machine or 'the largest node'} has {n:g}"

    most_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    most_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if not any(ask.fits(n) for n in nodes):
        if ask.gpu and most_gpu + _EPS < ask.gpu:
            fix = f"lower resources.gpu to at most {most_gpu:g}" if most_gpu else \
                "set resources.gpu: 0 to train on CPU, or " + \
                ("run on a cluster with GPUs (--address)" if machine else "add GPU nodes to the cluster")
            return Shortfall("resources.gpu", f"{ask.each} asks for {amount(ask.gpu, 'GPU')}", has(most_gpu), fix)
        if most_cpu + _EPS < ask.cpu:
            fix = f"lower resources.cpu to at most {most_cpu:g}" if most_cpu else "add nodes with CPUs to the cluster"
            return Shortfall("resources.cpu", f"{ask.each} asks for {amount(ask.cpu, 'CPU')}", has(most_cpu), fix)
        room = max(n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) + _EPS >= ask.gpu)
        return Shortfall("resources.cpu", f"{ask.each} asks for {ask.says()} on one node",
                         f"the nodes with {amount(ask.gpu, 'GPU')} have at most {room:g} CPUs",
                         f"lower resources.cpu to at most {room:g}")
    if ask.workers == 1:
        return None
    room = workers_that_fit(ask, nodes)
    if room >= ask.workers:
        return None
    where = machine or "the cluster"
    if room == 0:  # a worker fits only where the driver must sit too: one node holds them all
        cpu = math.floor((most_cpu - DRIVER_CPU) / ask.workers * 100) / 100
        return Shortfall("resources.cpu", f"each trial asks for {ask.workers} workers x {amount(ask.cpu, 'CPU')} and "
                         f"{DRIVER_CPU:g} for its driver", has(most_cpu), f"lower resources.cpu to at most {cpu:g}")
    total_gpu, total_cpu = (sum(n.get(k, 0.0) for n in nodes) for k in ("GPU", "CPU"))
    if ask.gpu and ask.workers * ask.gpu > total_gpu + _EPS:
        asks = f"{ask.workers} workers x {amount(ask.gpu, 'GPU')}"
        have = f"{where} has {amount(total_gpu, 'GPU')} in all"
    elif ask.workers * ask.cpu + DRIVER_CPU > total_cpu + _EPS:
        asks = f"{ask.workers} workers x {amount(ask.cpu, 'CPU')} and {DRIVER_CPU:g} for its driver"
        have = f"{where} has {amount(total_cpu, 'CPU')} in all"
    else:
        asks, have = f"{ask.workers} workers of {ask.says()}", f"the nodes hold at most {room} of them at once " \
            "(a worker cannot span nodes)"
    return Shortfall("resources.workers", f"each trial asks for {asks}", have,
                     f"lower resources.workers to at most {room}")


def workers_that_fit(ask: Ask, nodes: Sequence[Node]) -> int:
    """How many of one trial's workers `nodes` hold at once, its driver (workers > 1) placed where
    it costs the fewest."""
    held = [ask.fits(n) for n in nodes]
    if ask.workers == 1:
        return sum(held)
    return max((sum(held) - held[i] + ask.fits(n, DRIVER_CPU) for i, n in enumerate(nodes)
                if n.get("CPU", 0.0) + _EPS >= DRIVER_CPU), default=0)


# --- this machine, before Ray starts -------------------------------------------------------------


def local_node() -> dict[str, float]:
    """This machine's CPUs and GPUs as a local ray.init() counts them (cgroup limits,
    CUDA_VISIBLE_DEVICES, RAY_OVERRIDE_RESOURCES), through Ray's own resolver."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1")
        return {"CPU": float(spec.num_cpus), "GPU": float(spec.num_gpus)}
    except Exception:  # noqa: BLE001 - a private API: what it reads, read here
        import torch

        return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count())}


def check_local(ask: Ask, address: str | None) -> None:
    """Before `run` or `diagnose` starts a local Ray: SpecError where this machine can never hold
    one `ask` (nothing to check where the command joins a cluster)."""
    if starts_local(address) and (short := shortfall(ask, [local_node()], "this machine")):
        raise SpecError(f"spec error: {short.line()}")


def local_note(ask: Ask) -> str | None:
    """`validate`'s note where this machine can never hold one `ask` (the spec may be for a cluster)."""
    short = shortfall(ask, [local_node()], "this machine")
    return None if short is None else (f"{short.field}: {short.asks}, and {short.has}: a local run cannot start "
                                       "it; on a cluster it is checked when the run connects")


# --- the cluster, once Ray is up -----------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """What a Ray cluster can ever hold: its alive nodes and the nodes its autoscaler may add."""

    nodes: list[dict[str, float]]
    local: bool = False
    """The one-node Ray this process started."""
    grows: bool = False
    """An autoscaler may add nodes whose types are not known here: nothing is refused."""


def cluster(ask: Ask) -> Cluster:
    """The cluster this process's Ray is connected to. The autoscaler's node types count as nodes,
    each at most as many times as one `ask` could use (its max_count where smaller)."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    if is_local():
        return Cluster(nodes, local=True)
    types = _node_types()
    if types is not None:
        for resources, most in types:
            nodes += [dict(resources)] * (ask.workers + 1 if most < 0 else min(most, ask.workers + 1))
        return Cluster(nodes)
    return Cluster(nodes, grows=autoscaled() is not False)


def check_cluster(ask: Ask, echo: Callable[[str], None]) -> None:
    """Once Ray is up: SpecError where its cluster can never hold one `ask`."""
    judge(ask, cluster(ask), echo)


def judge(ask: Ask, c: Cluster, echo: Callable[[str], None]) -> None:
    """SpecError where `c` can never hold one `ask`; a note where no node can now but an
    autoscaler may add one."""
    short = shortfall(ask, c.nodes, "the local Ray" if c.local else None)
    if short is None:
        return
    if c.grows:
        echo(f"note: {short.field}: {short.asks}, and no node of the cluster holds that now; waiting for its "
             "autoscaler to add one (resources.pending_timeout bounds the wait)")
        return
    raise SpecError(f"spec error: {short.line()}")


def pending_timeout(r: Resources) -> float | None:
    """How long trials may wait for resources with none running (None: for ever): the spec's,
    else PENDING_TIMEOUT_S on the local Ray this process started, else for ever."""
    if r.pending_timeout is not None:
        return r.pending_timeout or None
    return PENDING_TIMEOUT_S if is_local() else None


def _node_types() -> list[tuple[dict[str, float], int]] | None:
    """The autoscaler's node types and their max_count (-1: no limit), where it reports them to
    Ray (the cluster config Ray Train reads too); None where it does not (Ray 2.60's own do not)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API
        return None
    if config is None or not config.node_group_configs:
        return None
    return [({k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs]


def autoscaled() -> bool | None:
    """Whether the cluster has an autoscaler, from the status its monitor writes: without one
    (`ray start` by hand) every node's type is the monitor's own `node_<id>`. None: no status."""
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(b"__autoscaling_status")
        mapping = json.loads(raw)["autoscaler_report"]["node_type_mapping"] if raw else None
    except Exception:  # noqa: BLE001 - a private API
        return None
    if not mapping:
        return None
    return any(kind != f"node_{node}" for node, kind in mapping.items())
