"""A spec value that names a local path or a hub id: the one rule by which a value that is not
there is a mistyped path (an error before Ray starts) rather than a hub id (read by the trials)."""

from __future__ import annotations

from pathlib import Path

# the endings of the files a split is read from (and of their compressed forms): a hub id has none
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv",
                 ".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".tar")
DATA_FIX = "fix the path, or give a hub dataset id as org/name"


def written_as_path(value: str) -> bool:
    """True when `value` can only be a local path: it starts with / ./ ../ or ~, has a path
    separator beyond a hub id's one `org/name` slash, or ends in a data file's suffix. A URL
    (`scheme://`) is none of these: the reader takes it as it is."""
    if "://" in value:
        return False
    return (value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value
            or Path(value).suffix.lower() in FILE_SUFFIXES)


def missing(value: str) -> bool:
    """A value written as a path that is not there: a spec error, where a hub id is read as one."""
    return written_as_path(value) and not Path(value).expanduser().exists()


def not_found(where: str, value: str, what: str, fix: str, spec_dir: Path | None = None) -> str:
    """The one line for a path that is not there: the field, the value, where a relative one was
    looked for (the spec's folder, then the current directory) and the fix."""
    tried = ""
    if not Path(value).expanduser().is_absolute():
        spec = f"the spec's folder {spec_dir.resolve()}" if spec_dir is not None else "next to the spec"
        tried = f" (looked for in {spec}, then in the current directory {Path.cwd()})"
    return f"spec error: {where}: no such {what} {value!r}{tried}; {fix}"
