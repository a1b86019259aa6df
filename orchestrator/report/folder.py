"""The report's folder, complete or absent: a report is written into a folder beside its place
(`.NAME.partial-XXXXXX`, on the same filesystem), then renamed into place, so the previous
report stays whole until the new one is, and a Ctrl-C or an error leaves no half of either."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator import sigint

PARTIAL, OLD = "partial", "old"
"""A leftover's kind, in its name `.NAME.KIND-XXXXXX`: a report being written (removed by the next
write), or the previous report being replaced (put back by the next write if its place is empty:
a SIGKILL between the two renames)."""


def problem(out_dir: Path, owned: Callable[[Path], bool]) -> str | None:
    """Why out_dir cannot be replaced by a report (None: it can): it holds the working directory,
    or folders that are not the report's. Files of its own at its top are kept (carried over)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    here, there = Path.cwd().resolve(), out_dir.resolve()
    if here == there or there in here.parents:
        return "holds the working directory"
    folders = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and not p.is_symlink()
                     and not owned(Path(p.name)))
    if folders:
        return f"holds folders that are not the report's ({', '.join(folders)})"
    return None


@contextlib.contextmanager
def replaced(out_dir: Path, owned: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty folder beside out_dir for the block to write the report into; once the block
    ends, rename it to out_dir, in place of the previous folder, whose files that are not `owned` by
    the report (relative paths) are carried over. If the block raises, remove the folder. Writers
    beside one another take turns (an flock on the parent), so every leftover seen is a dead one's."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # the link stays; the folder it names is replaced
        out_dir = out_dir.resolve()
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _turn(parent):
        if why := problem(out_dir, owned):
            raise OSError(f"{out_dir}: {why}; give the report a folder of its own")
        _clean(out_dir)
        new = _beside(out_dir, PARTIAL)
        try:
            yield new
            if out_dir.exists():
                _carry(out_dir, new, owned)
            _swap(new, out_dir)
        finally:
            shutil.rmtree(new, ignore_errors=True)  # gone already once swapped in


def _beside(out_dir: Path, kind: str) -> Path:
    """A new empty folder `.NAME.KIND-XXXXXX` beside out_dir (permissions as mkdir makes them)."""
    while True:
        path = out_dir.parent / f".{out_dir.name}.{kind}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _leftovers(out_dir: Path, kind: str) -> list[Path]:
    prefix = f".{out_dir.name}.{kind}-"
    return sorted(p for p in out_dir.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _clean(out_dir: Path) -> None:
    """Remove what an earlier write that was killed left beside out_dir; put the previous report
    back first if its place is empty."""
    for old in _leftovers(out_dir, OLD):
        if not out_dir.exists():
            os.rename(old, out_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for partial in _leftovers(out_dir, PARTIAL):
        shutil.rmtree(partial, ignore_errors=True)


def _carry(old: Path, new: Path, owned: Callable[[Path], bool]) -> None:
    """Link (else copy) into `new` every file of `old` that the report does not own and did not
    write: the user's own files in the folder outlive the report they sat beside."""
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old)
        target = new / rel
        if owned(rel) or target.exists() or target.is_symlink():
            continue
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        elif path.is_dir():
            target.mkdir()
        else:
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def _swap(new: Path, out_dir: Path) -> None:
    """Rename `new` to out_dir, the previous out_dir set aside first, then removed. A Ctrl-C between
    the two renames is held back; a SIGKILL there leaves out_dir absent and the previous report as
    `.NAME.old-XXXXXX`, which the next write puts back before it begins."""
    with sigint.held():
        old = None
        if out_dir.exists():
            old = _beside(out_dir, OLD)
            os.rename(out_dir, old)   # onto an empty folder: replaces it
        os.rename(new, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _turn(parent: Path) -> Iterator[None]:
    """An exclusive flock on the parent folder for the block (a filesystem without flock: none)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
