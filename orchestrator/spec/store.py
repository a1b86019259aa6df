"""The local MLflow store a --tracking-uri names (a SQLite file, a file-store folder), checked from
its files before anything opens it: a file that is not a database, a database that is not
MLflow's, or, for a command that only reads (`report`), a store that is not there. MLflow itself
would print a raw DatabaseError, or quietly create an empty store where the user mistyped a path."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from orchestrator.spec.model import SpecError

SQLITE_HEADER = b"SQLite format 3\x00"
"""The first 16 bytes of every SQLite database file."""
MLFLOW_TABLES = {"alembic_version", "experiments", "runs", "metrics", "tags"}
"""Tables every MLflow SQL store has (its schema version, and what the readers query)."""
READ_FIX = "run a sweep first, or point --tracking-uri at its store"


def check_sqlite(uri: str, path: Path, creates: bool) -> None:
    """SpecError, one line naming the flag and the file, unless `path` is an MLflow SQLite store,
    or (`creates`: a command that writes) a file MLflow may start one in: absent in a writable
    folder, or empty (0 bytes, or a database without tables: SQLite reads both as a new one)."""
    where, path = f"error: --tracking-uri {uri}", path.resolve()
    if not path.exists():
        folder = path.parent
        if not creates:
            raise SpecError(f"{where}: no such store ({path}); {READ_FIX}")
        if not folder.is_dir():
            raise SpecError(f"{where}: folder {folder} does not exist; create it or point the URI elsewhere")
        if not os.access(folder, os.W_OK):
            raise SpecError(f"{where}: folder {folder} is not writable")
        return
    if path.is_dir():
        raise SpecError(f"{where}: {path} is a folder; give the SQLite file in it (sqlite:///{path}/mlflow.db)")
    try:
        with open(path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as err:
        raise SpecError(f"{where}: {path} cannot be read ({err.strerror or err}); fix its permissions, or point "
                        "--tracking-uri elsewhere") from None
    if header and header != SQLITE_HEADER:
        raise SpecError(f"{where}: {path} is not a SQLite database (it does not start with 'SQLite format 3'); "
                        "point --tracking-uri at the store a sweep wrote, or move the file away to start a new one")
    tables = _tables(path, where) if header else set()
    if tables is None:
        return   # another process holds it locked: a store in use, which MLflow waits for itself
    if not tables and not creates:
        raise SpecError(f"{where}: {path} is an empty database, no store a sweep wrote; {READ_FIX}")
    if tables and not tables >= MLFLOW_TABLES:
        raise SpecError(f"{where}: {path} is a SQLite database but not an MLflow store (its tables: "
                        f"{', '.join(sorted(tables)[:6])}{', ...' if len(tables) > 6 else ''}); point --tracking-uri "
                        "at the store a sweep wrote, or at a new file")


def is_mlflow(path: Path) -> bool:
    """Whether `path` is a SQLite file with MLflow's tables, read-only; False for anything else
    (absent, not SQLite, damaged, locked by a writer)."""
    try:
        tables = _tables(path.resolve(), "") if path.is_file() else None
    except SpecError:
        return False
    return bool(tables) and tables >= MLFLOW_TABLES


def check_folder(uri: str, path: Path, creates: bool) -> None:
    """SpecError unless `path` is an MLflow file store (a folder), or, for `creates`, may become one."""
    if path.exists() and not path.is_dir():
        raise SpecError(f"error: --tracking-uri {uri}: {path} is a file, not an MLflow store folder")
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise SpecError(f"error: --tracking-uri {uri}: MLflow 3 keeps folder stores read-only (maintenance mode) and "
                        "refuses them; use sqlite:///mlflow.db (`mlflow migrate-filestore` moves a folder's runs "
                        "there), or set MLFLOW_ALLOW_FILE_STORE=true to use the folder")
    if creates:
        return
    path = path.resolve()
    if not path.exists():
        raise SpecError(f"error: --tracking-uri {uri}: no such store ({path}); {READ_FIX}")
    if not (path / ".trash").is_dir() and not any(path.glob("*/meta.yaml")):
        raise SpecError(f"error: --tracking-uri {uri}: {path} holds no MLflow store (no experiment "
                        f"folder with a meta.yaml); {READ_FIX}")


def _tables(path: Path, where: str) -> set[str] | None:
    """The tables of a SQLite file, read-only (nothing is written, not even a journal); None
    while another process holds it locked (a sweep writing to it)."""
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as err:
        if isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err)):
            return None
        raise SpecError(f"{where}: {path} is a damaged SQLite database ({err}); restore it from a copy, or point "
                        "--tracking-uri at a new file") from None
