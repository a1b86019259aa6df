"""attack-sweep's own cache folder, named once for both sides (the orchestrator's toy world,
locks and store template; the trials' step-0 readings): ATTACK_SWEEP_CACHE, else
~/.cache/attack-sweep."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """attack-sweep's own cache: ATTACK_SWEEP_CACHE, else ~/.cache/attack-sweep."""
    return Path(os.environ.get("ATTACK_SWEEP_CACHE") or Path.home() / ".cache" / "attack-sweep")
