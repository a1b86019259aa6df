"""How the orchestrator prints: the default `echo` and budgets in few characters."""

from __future__ import annotations


def say(line: str) -> None:
    """Print one progress line. The default `echo`: a function of this module, because Tune pickles
    the callbacks that hold it, and pickle finds builtins.print by name, which fails once something
    in the process has replaced builtins.print (seen in the test suite: `PicklingError: Can't pickle
    <built-in function print>: it's not the same object as builtins.print`)."""
    print(line, flush=True)


def amount(value: float) -> str:
    """A budget in few characters: 12,345 or 3.2e+11."""
    return f"{value:,.0f}" if value < 1e7 else f"{value:.3g}"

