"""Where a sweep's records came from: the attack-sweep version and git commit, the versions of
the packages that decide a result, Python, and this machine's devices. Tagged on the sweep run
(provenance.<key>) and kept whole as an artifact, one file per `run` of the sweep.

Nothing here may fail a sweep or take long: a missing package, git or GPU drops its entry. No
environment variable is read or recorded (they hold tokens and keys).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "ray", "deepspeed", "mlflow")
"""Packages whose version can change a trial's result or its records."""
GIT_TIMEOUT_S = 3.0


def gather() -> dict[str, str]:
    """Provenance as flat strings: version, git_commit and git_dirty (only when the package
    source is a file tracked in a git checkout), <package> for each installed one of PACKAGES,
    python, platform, cpus, and cuda (device names) where torch sees CUDA devices. The devices
    are this machine's, the driver's: on a Ray cluster the trials run elsewhere."""
    out: dict[str, str] = {}
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["version"] = metadata.version("attack-sweep")
    out.update(git(Path(__file__).resolve().parent.parent))  # the orchestrator package
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    out["python"] = platform.python_version()
    out["platform"] = platform.platform(terse=True)
    out["cpus"] = str(os.cpu_count() or 0)
    if gpus := cuda_devices():
        out["cuda"] = ", ".join(gpus)
    return out


def git(package_dir: Path) -> dict[str, str]:
    """{git_commit, git_dirty} of the checkout that tracks `package_dir`'s source, else {} (an
    installed wheel, no git, a virtual environment inside some other checkout)."""
    if shutil.which("git") is None:
        return {}

    def run(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    # the checkout must track this very file: a site-packages copy inside a checkout is not its source
    if run("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return {}
    commit = run("rev-parse", "HEAD")
    if not commit:
        return {}
    out = {"git_commit": commit}
    status = run("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        out["git_dirty"] = str(bool(status)).lower()
    return out


def cuda_devices() -> list[str]:
    """Names of the CUDA devices torch sees, without creating a CUDA context in this process:
    from nvidia-smi where there is one, else only how many. [] without torch or CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():  # NVML or a device count: no context is created
            return []
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch, or a broken driver: no reason to fail a sweep
        return []
    if shutil.which("nvidia-smi"):
        try:
            proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=5, stdin=subprocess.DEVNULL)
            names = [n.strip() for n in proc.stdout.splitlines() if n.strip()]
            if proc.returncode == 0 and len(names) == count:  # else some are hidden from torch: which, unknown
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    return [f"{count} CUDA device(s)"]
