"""attack-sweep's own cache folder, named once for both sides (the orchestrator's toy world,
locks and store template; the trials' step-0 readings): ATTACK_SWEEP_CACHE, else
~/.cache/attack-sweep."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """attack-sweep's own cache: ATTACK_SWEEP_CACHE, else ~/.cache/attack-sweep."""
    return Path(os.environ.get("ATTACK_SWEEP_CACHE") or Path.home() / ".cache" / "attack-sweep")


def source_digest(folder: Path) -> str:
    """The source of a package folder (every .py below it, by relative name and bytes): what a cache
    keys on so that changed code never reads an old entry."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
