"""Ray for the stages of a sweep: connect to a cluster or start a local Ray (watched, so that it
does not outlive the driver), how often a trial or task whose process died is retried, and the
error line a failed one leaves."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from orchestrator import sigint

WORKER_RETRIES = 2
"""How many times Tune reruns a trial whose process died (tune.FailureConfig.max_failures). Only
the death of the trial's own process reaches Tune as a failure: run_trial reports whatever the
attack raises as the trial's error, so this retries the crashes a rerun can survive (SIGKILL, the
OOM killer, a lost node), never a bug or bad data, which would only fail again."""


def last_line(text: str) -> str:
    """The last non-blank line of a traceback: the exception and its message ('' if none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# The watchdog: a process of its own (so a SIGKILL of the driver cannot take it along) that
# waits for the driver to die, then ends what is left of the local Ray instance the driver
# started. Ray's own fate-sharing (PR_SET_PDEATHSIG) takes the raylet and GCS down with the
# driver, but not the workers or the dashboard and runtime-env agents the raylet forked: measured
# on Ray 2.60, a trial's worker outlived a SIGKILLed driver by a few seconds and the agents by
# 40-70 s; a worker stuck in a CUDA call holds its GPU as long. Every second the watchdog notes the
# Ray processes (those the driver started for Ray and all their descendants, each with its start
# time, so a reused pid is never touched); once its parent is no longer the driver it sends
# them SIGTERM, then SIGKILL to whatever is left 3 s later, and exits. It also exits, touching
# nothing, when every process it watches has ended (ray.shutdown()).
_WATCHDOG = r"""
import os, signal, sys, time
import psutil
driver, roots = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
for sig in (signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
seen = {}
def alive(pid, started):
    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while os.getppid() == driver:
    for root in roots:
        try:
            procs = [psutil.Process(root)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            try:
                seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
    seen = {pid: t for pid, t in seen.items() if alive(pid, t)}
    if not seen:
        sys.exit(0)
    time.sleep(1)
for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 0)):
    left = {pid: t for pid, t in seen.items() if alive(pid, t)}
    for pid in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while wait and time.time() < deadline and any(alive(pid, t) for pid, t in left.items()):
        time.sleep(0.1)
"""


def start_ray(address: str | None) -> None:
    """Connect to --address, or start a local Ray watched by the watchdog (once per process).
    A local Ray whose start is cut short (a Ctrl-C, an error) is ended here: ray.shutdown() knows
    only a Ray that ray.init() finished starting, and the watchdog starts after it. Left alone,
    the raylet and GCS die with the driver, but the dashboard and runtime-env agents the raylet
    forked outlive it by about 60 s (measured on Ray 2.60: a Ctrl-C while ray.init waits for its
    node, which on 2 busy cores takes 5-30 s, and reaches Python only once that wait returns)."""
    import ray

    if not ray.is_initialized():
        local = address is None
        before = _children()
        try:
            ray.init(address=address, include_dashboard=False if local else None,
                     log_to_driver=False, configure_logging=True, logging_level="ERROR")
        except BaseException:
            if local:
                # held: another Ctrl-C would leave them half-ended; no psutil: nothing to end by
                with sigint.held(), contextlib.suppress(ImportError):
                    _end(_started_since(before))
            raise
        if local:
            _watch_local_ray(before)


def starts_local(address: str | None) -> bool:
    """Whether start_ray(address) would start a local Ray rather than join one: as ray.init
    decides, a cluster named by RAY_ADDRESS or last started here with `ray start` is joined."""
    if address is not None:
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # noqa: BLE001 - a private API: where it cannot tell, do not assume local
        return False


def is_local() -> bool:
    """Whether this process's Ray is one it started itself (one node), not a cluster it joined."""
    try:
        import ray._private.worker as ray_worker

        return bool(ray_worker._global_node is not None and ray_worker._global_node.head)
    except Exception:  # noqa: BLE001 - a private API, or a Ray client: a cluster
        return False


def _children() -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process().children()}
    except Exception:  # noqa: BLE001 - no psutil: no watchdog, nothing else changes
        return set()


def _started_since(before: set[int]) -> list:
    """This process's children that are not in `before`, and all their descendants, as
    psutil.Process objects: each holds its pid's start time, and psutil signals none whose pid
    was reused since."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for child in psutil.Process().children():
        if child.pid not in before:
            with contextlib.suppress(psutil.Error):
                for p in [child, *child.children(recursive=True)]:
                    procs.setdefault(p.pid, p)
    return list(procs.values())


def _end(procs: list) -> None:
    """SIGKILL each of `procs` (psutil.Process) and wait for them (2 s at most). A Ray that never
    finished starting holds nothing to save, and its GCS and raylet can take more than 3 s to end
    on SIGTERM on 2 busy cores."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=2)


def _watch_local_ray(before: set[int]) -> subprocess.Popen | None:
    """Start the watchdog over the Ray processes this driver just started (the processes Ray's
    node lists, or failing that the children that appeared during ray.init). Never called for a
    cluster given with --address, and a ray.init() that only connected (RAY_ADDRESS) started none."""
    roots: set[int] = set()
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        roots = {info.process.pid for infos in node.all_processes.values() for info in infos
                 if getattr(info, "process", None) is not None}
    except Exception:  # noqa: BLE001 - a private API: fall back to what appeared
        roots = _children() - before
    if not roots:
        return None
    try:
        return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *map(str, sorted(roots))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:
        return None
