"""Ctrl-C outside the sweep's own handler (orchestrator/sweep/signals.py): held back over a step
that must not be cut in two, and kept quiet while the process exits."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it may set a handler


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block (a few seconds at most) with Ctrl-C held back until it ends, then delivered
    once to the handler that was there before. Off the main thread the block runs as it is."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if pending:  # the block ended: the Ctrl-C it held now reaches whoever handles it
        signal.raise_signal(signal.SIGINT)


def leaving(code: int) -> None:
    """From here on the process exits with `code`: a Ctrl-C is ignored while the exit handlers
    (ray.shutdown, MLflow's) finish, where Python would print 'Exception ignored in atexit
    callback' and a traceback; a second one leaves at once, printing nothing (the watchdog ends
    what is left of the local Ray, orchestrator/cluster.py)."""
    if not _main_thread():
        return
    presses: list[int] = []

    def quiet(signum, frame) -> None:
        presses.append(signum)
        if len(presses) > 1:
            flush()
            os._exit(code)

    signal.signal(signal.SIGINT, quiet)


def flush() -> None:
    """Flush stdout and stderr, whatever became of their readers (| head that went away)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
