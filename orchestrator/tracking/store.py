"""The tracking store: an MlflowClient that waits out an unreachable tracking server, and a new
sqlite store started from a migrated empty one."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from orchestrator.echo import say
from trainables.cache import cache_root

PATIENCE_S = 300.0
"""How long MLflow calls wait for an unreachable tracking server before the sweep gives up."""
# MLflow retries a failed HTTP request 7 times with doubling backoff (about 4 minutes) and waits
# 120 s for an answer, all of it silently; shortened (unless set) so that Patient, which says
# what it is waiting for, is in control. Read by MLflow at every request.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def unreachable(err: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server could not be reached or did not
    answer (worth waiting for), rather than because it refused the call (a 4xx, an error in us)."""
    if isinstance(err, RestException):  # the server answered, with an error
        return False
    if isinstance(err, MlflowException):  # how MLflow's HTTP layer reports no answer
        text = str(err)
        return text.startswith("API request to") and " failed with " in text
    import requests

    return isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError))


class Patient:
    """An MlflowClient whose calls wait out an unreachable tracking server: retried with backoff
    (0.5 s doubling to 10 s) for up to `patience_s` from the first failure, announced by one
    line, and one more line once the server answers again. Past the patience the error is
    raised, and later calls get one try each until a call succeeds again (so closing the
    records after giving up does not wait as long again). Errors the server answers with are
    never retried; an answer that keeps failing (HTTP 5xx) is waited on like no answer. A write
    retried after the server died mid-request may have been applied once already: MLflow stores
    a repeated metric point, tag or param once, but a run can be created twice (the spare stays
    without a status, out of the report, and is closed KILLED with the sweep)."""

    def __init__(self, client: MlflowClient, uri: str, echo: Callable[[str], None] = say,
                 patience_s: float = PATIENCE_S):
        self._client, self._uri, self._echo, self._patience = client, uri, echo, patience_s
        self._down_since: float | None = None
        self._gave_up = False

    def __getattr__(self, name: str):
        if name.startswith("_"):  # never reached for our own attributes, unless half-built (unpickling)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return self._call(attr, args, kwargs)

        return call

    def _call(self, fn, args, kwargs):
        delay = 0.5
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as err:
                if not unreachable(err):
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    if not self._gave_up:
                        self._echo(f"tracking server {self._uri} unreachable; retrying writes for up to "
                                   f"{self._patience:g} s")
                waited = now - self._down_since
                if self._gave_up or waited >= self._patience:
                    self._gave_up = True
                    raise
                time.sleep(min(delay, self._patience - waited))
                delay = min(2 * delay, 10.0)
                continue
            if self._down_since is not None and not self._gave_up:
                self._echo(f"tracking server {self._uri} reachable again after "
                           f"{time.monotonic() - self._down_since:.0f} s; every record kept")
            self._down_since, self._gave_up = None, False
            return out


def seed_sqlite(tracking_uri: str) -> None:
    """Start a new sqlite store as a copy of an empty one MLflow migrated once (per MLflow version,
    cached under the attack-sweep cache): MLflow builds a new store by running its schema
    migrations one by one, 1.5-4 s on 2 cores, for every new store. MLflow then opens the copy as
    its own (schema verified, Default experiment created with this store's artifact root). Any
    problem leaves the store to MLflow, as before."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
    if path.name in ("", ":memory:") or path.exists():
        return
    try:
        import shutil

        import mlflow
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables  # private: any change falls back to MLflow

        template = cache_root() / "mlflow-stores" / f"empty-{mlflow.__version__}.db"
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
            engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
            try:
                _initialize_tables(engine)
            finally:
                engine.dispose()
            os.replace(tmp, template)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.seed")
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, path)  # only where still absent: a store created meanwhile is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - a speed-up only: MLflow creates the store itself
        return

