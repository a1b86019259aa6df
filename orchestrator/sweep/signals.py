"""A Ctrl-C that cannot be lost: the SIGINT handler and the flag it sets. No Ray here: the
InterruptGuard (guard.py) reads the flag inside Tune's loop."""

from __future__ import annotations

import threading

INTERRUPTED = threading.Event()
"""Set by on_sigint. Python drops a KeyboardInterrupt raised while the main thread runs a
finalizer (the __del__ of the many Ray handles a sweep lets go), and the sweep would then run to
the end: the InterruptGuard turns this flag back into a KeyboardInterrupt at the next step of
Tune's loop (and the driver checks it before the next defence)."""


def on_sigint(signum, frame) -> None:
    """The sweep's SIGINT handler: sets INTERRUPTED, then raises KeyboardInterrupt."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


class Interrupted(Exception):  # noqa: N818 - a Ctrl-C, not an error
    """A Ctrl-C seen by the InterruptGuard. Tune cleans up (stops its trials' actors and frees
    their resources) only when its loop fails with an Exception, so the guard raises this, and
    fit() turns it back into a KeyboardInterrupt."""
