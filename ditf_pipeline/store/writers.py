"""The writers of a local store in this process, and the consolidated metadata the last one writes.

Every process writing a local store holds a shared `lockf` lock on `.ditf/locks/writers.lock`
while it may write; consolidated metadata (every node's metadata copied into the root's
zarr.json, so a reader opens the store with one read) is written only under the exclusive
lock, i.e. by the last writer. A writer drops the copy right before its first write
(`note_write`, called through its backend's write hook), so the copy never misses a change and a
command refused before writing leaves the store as it was.

The same exclusive lock proves that no other writer lives: a process that gets it (as it joins
or leaves) sweeps what dead writers left, so a rerun after a crash leaves the files an
uninterrupted run leaves. Each writer marks itself by a file in `.ditf/writers/` while it
writes; a marker found by a writer alone is a dead writer's, and only then is the whole store
searched for zarr's temp files (`*.partial`): an ordinary run pays for two small listings.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zarr
from zarr.storage import LocalStore

from ..core.errors import DitfError
from . import faults, locks
from .layout import LOCKS, META, STAGING, TRASH

__all__ = ["WRITERS", "close_writers", "consolidate", "join", "leave", "note_write", "sweep", "sweep_if_alone"]

_WRITERS_LOCK = f"{LOCKS}/writers.lock"
#: how long a new writer waits while the last writer of another process writes the copy
_WRITERS_WAIT = 600.0
#: one marker file per live writer process (removed as it leaves; a dead writer's stays)
WRITERS = f"{META}/writers"


@dataclass
class _Writer:
    """This process as one writer of one local store (POSIX locks belong to processes)."""

    fd: int  # the descriptor holding our shared lock on `.ditf/locks/writers.lock`
    drop: Callable[[], None]  # drops the consolidated copy; run right before the first write
    count: int = 1  # FeatureStore objects of this process open for writing
    wrote: bool = False  # anything written since we joined (a refused command writes nothing)
    marker: Path | None = None  # our file in `.ditf/writers/`


_writers: dict[str, _Writer] = {}  # absolute store folder -> this process as its writer


def _key(path: Path) -> str:
    return os.path.abspath(path)


def note_write(path: Path) -> None:
    """Right before a write to the store at `path`: the first one drops its consolidated copy."""
    with locks.GUARD:
        writer = _writers.get(_key(path))
        if writer is None or writer.wrote:
            return
        writer.wrote = True  # (the drop's own write finds it set: no recursion)
    writer.drop()


def join(path: Path, drop: Callable[[], None]) -> None:
    """Count this process among the store's writers (a shared `lockf` lock, once per process).

    Waits while another process holds the exclusive lock (it is writing consolidated metadata).
    `drop` removes the consolidated copy; it runs right before this process's first write.
    """
    key = _key(path)
    with locks.GUARD:
        if key in _writers:
            _writers[key].count += 1
            return
    lock = path / _WRITERS_LOCK
    fd = locks.open_lock_file(lock, path)
    if locks.try_exclusive(fd):  # no other writer lives: what is left is a dead writer's
        try:
            sweep(path)
        finally:
            locks.share_again(fd)  # (converts our exclusive lock; nobody can slip in between)
    else:
        locks.wait_shared(fd, lock, _WRITERS_WAIT)
    with locks.GUARD:
        if key in _writers:  # another thread of this process joined meanwhile
            os.close(fd)  # (POSIX locks are per process: closing any descriptor of the file drops ours)
            locks.share_again(_writers[key].fd)
            _writers[key].count += 1
        else:
            _writers[key] = _Writer(fd, drop, marker=_mark(path))


def _mark(path: Path) -> Path | None:
    """Our marker in `.ditf/writers/`: while it exists, this writer has not ended cleanly."""
    marker = path / WRITERS / f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        return None  # a read-only folder: the first write reports it
    return marker


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def sweep(path: Path, thorough: bool = False) -> list[str]:
    """Remove what dead writers left in the local store at `path`; what was removed.

    Call it only while holding the writers lock exclusively (no other writer lives). Removed:
    staging folders, the trash, zarr's and ditf's temp files (`*.partial`, searched only when a
    dead writer's marker says a write may have been cut, or when `thorough`), the dead writers'
    markers, and store creations beside the store (`backends.local.stray_roots`, each proved
    dead by its own lock).
    """
    from .backends.local import stray_roots  # (the backend imports this module's siblings)

    removed = [str(s) for s in stray_roots(path)]
    for folder in (STAGING, TRASH):
        for entry in _entries(path / folder):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(str(entry.relative_to(path)))
    with locks.GUARD:
        ours = {str(w.marker) for w in _writers.values() if w.marker is not None}
    dead = [m for m in _entries(path / WRITERS) if str(m) not in ours]
    if dead or thorough:
        for partial in path.rglob("*.partial"):
            partial.unlink(missing_ok=True)
            removed.append(str(partial.relative_to(path)))
        for marker in dead:
            marker.unlink(missing_ok=True)
            removed.append(str(marker.relative_to(path)))
    return removed


def sweep_if_alone(path: Path) -> bool:
    """`sweep` the local store at `path` thoroughly if no other process writes it (False, nothing
    removed, if one does): what `ditf doctor --repair` runs."""
    with locks.GUARD:
        entry = _writers.get(_key(path))
        if entry is not None:  # we are a writer ourselves: our shared lock turns exclusive if we are alone
            if not locks.try_exclusive(entry.fd):
                return False
            try:
                sweep(path, thorough=True)
            finally:
                locks.share_again(entry.fd)
            return True
    fd = locks.open_lock_file(path / _WRITERS_LOCK, path)
    try:
        if not locks.try_exclusive(fd):
            return False
        sweep(path, thorough=True)
        return True
    finally:
        os.close(fd)


def _consolidated(path: Path) -> bool:
    """Whether the root's zarr.json holds a consolidated copy (an unreadable one counts as held)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is not None
    except (OSError, ValueError, AttributeError):
        return True


def consolidate(path: Path) -> None:
    """Write every node's metadata into the root's zarr.json (zarr's consolidated metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "not in the v3 spec yet", ".ditf is no zarr node"
        zarr.consolidate_metadata(faults.wrap(LocalStore(path)))


def leave(path: Path, restore: bool = True) -> bool:
    """Uncount one writable store; the last one of the last writing process consolidates.

    True when consolidated metadata was written. With other writers active (their shared
    locks refuse our exclusive one) nothing is written: the last of them does it. A writer that
    wrote nothing writes the copy only if it is missing and `restore` (it ended normally: a
    refused command leaves the store as it was).
    """
    key = _key(path)
    with locks.GUARD:
        entry = _writers.get(key)
        if entry is None:
            return False
        entry.count -= 1
        if entry.count > 0:
            return False
        del _writers[key]
        try:
            if entry.marker is not None:
                entry.marker.unlink(missing_ok=True)
            if not locks.try_exclusive(entry.fd):  # converts our shared lock if we are alone
                return False
            sweep(path)  # alone: whatever writers that died meanwhile left
            # nothing written here (e.g. a refused command) leaves the store as it was, but a
            # copy that a killed writer dropped is written back
            if (entry.wrote or (restore and not _consolidated(path))) and (path / "zarr.json").is_file():
                consolidate(path)
                return True
            return False
        finally:
            os.close(entry.fd)


def close_writers(restore: bool = True) -> None:
    """Close every store this process still has open for writing (the CLI calls it as a command
    ends, with `restore` False when it failed; at interpreter exit zarr's event loop is gone
    already, so atexit cannot do it)."""
    for key in list(_writers):
        with locks.GUARD:
            if key in _writers:
                _writers[key].count = 1
        try:
            leave(Path(key), restore)
        except (OSError, DitfError):  # a store removed meanwhile: nothing left to consolidate
            pass
