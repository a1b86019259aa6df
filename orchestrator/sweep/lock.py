"""A second `run` of a sweep against the same tracking store on this machine is refused while the
first holds the sweep's lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.spec.model import safe_name
from trainables.cache import cache_root


class SweepLocked(LookupError):
    """Another `run` of this sweep against the same tracking store holds its lock on this
    machine. (A LookupError, so that the CLI prints it as its one line and exits 2.)"""


@contextlib.contextmanager
def sweep_lock(name: str, tracking_uri: str):
    """Hold this machine's lock on (sweep, tracking store) for the duration, or raise SweepLocked.

    Two runs of one sweep against one store at once would start the same pending trials twice,
    and each would tag the other's live runs superseded. The second run exits at once with one
    line naming the holder, rather than waiting: a run started twice by mistake should say so,
    not sit silent for hours, and once the first ends a rerun resumes from its records anyway.
    The lock is an flock(2) on lock_dir()/<sweep>-<digest of the store>.lock: the kernel releases
    it when its process dies, however it dies, so a crashed run never leaves a stale lock. The
    file is named by the store, not the working directory, so runs started from two directories
    against one store see each other. It guards one machine only: runs on two machines sharing a
    tracking server can still duplicate trials, and the report counts such duplicates once."""
    path = lock_dir() / f"{safe_name(name)[:80]}-{_store_digest(tracking_uri)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime; not inherited by children
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise SweepLocked(
                f"another `attack-sweep run` of sweep {name!r} against {tracking_uri} is running on this "
                f"machine ({holder}); it holds {path}. Let it finish (or stop it), then rerun: recorded trials "
                "are kept") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield path
    finally:
        fh.close()  # releases the lock


def lock_dir() -> Path:
    """Where sweep locks live: the attack-sweep cache (ATTACK_SWEEP_CACHE, else ~/.cache/attack-sweep)."""
    return cache_root() / "locks"


def _store_digest(tracking_uri: str) -> str:
    """A digest naming the tracking store, however it was spelled: a relative sqlite or file path
    is made absolute, so two working directories share a lock only when they share a store."""
    uri = tracking_uri.strip()
    if uri.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        uri = "file:" + str(Path(path.removeprefix("//")).resolve())
    else:
        parts = urlsplit(uri.rstrip("/"))
        uri = parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()
    return hashlib.sha256(uri.encode()).hexdigest()[:12]
