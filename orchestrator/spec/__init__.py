"""The sweep spec, from a YAML file to a validated SweepSpec, and the checks before a sweep:
the typed models (model.py), reading a file (load.py), the attacker space (space.py), run names
(attackers.py), the preflight and checkpoint checks, the budget notes and the sweep's cost and time
(budget_notes.py, cost.py, estimate.py), and the embedded toy world.

from orchestrator import spec
    sp = spec.load("search_spaces/quickstart.yaml", ["max_steps=50"])
"""

from orchestrator.spec.load import TOYWORLD, apply_overrides, format_errors, from_dict, load, overlay
from orchestrator.spec.model import (
    ADAPTIVE,
    DEFAULT_TRACKING_URI,
    NAME,
    Algorithm,
    Defence,
    Resources,
    Search,
    SpecError,
    SweepSpec,
    evaluator_places,
    safe_name,
    unknown_key,
)

__all__ = ["ADAPTIVE", "DEFAULT_TRACKING_URI", "NAME", "TOYWORLD", "Algorithm", "Defence", "Resources", "Search",
           "SpecError", "SweepSpec", "apply_overrides", "evaluator_places", "format_errors", "from_dict", "load",
           "overlay", "safe_name", "unknown_key"]
