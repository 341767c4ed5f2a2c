"""The writers of a local store in this process, and the consolidated metadata the last one writes.

Every process writing a local store holds a shared `lockf` lock on `.ditf/locks/writers.lock`
while it may write; consolidated metadata (every node's metadata copied into the root's
zarr.json, so a reader opens the store with one read) is written only under the exclusive
lock, i.e. by the last writer. A writer drops the copy right before its first write
(`note_write`, called through its backend's write hook), so the copy never misses a change and a
command refused before writing leaves the store as it was.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zarr
from zarr.storage import LocalStore

from ..core.errors import DitfError
from . import faults, locks
from .layout import LOCKS

__all__ = ["close_writers", "consolidate", "join", "leave", "note_write"]

_WRITERS_LOCK = f"{LOCKS}/writers.lock"
#: how long a new writer waits while the last writer of another process writes the copy
_WRITERS_WAIT = 600.0


@dataclass
class _Writer:
    """This process as one writer of one local store (POSIX locks belong to processes)."""

    fd: int  # the descriptor holding our shared lock on `.ditf/locks/writers.lock`
    drop: Callable[[], None]  # drops the consolidated copy; run right before the first write
    count: int = 1  # FeatureStore objects of this process open for writing
    wrote: bool = False  # anything written since we joined (a refused command writes nothing)


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
    locks.wait_shared(fd, lock, _WRITERS_WAIT)
    with locks.GUARD:
        if key in _writers:  # another thread of this process joined meanwhile
            os.close(fd)  # (POSIX locks are per process: closing any descriptor of the file drops ours)
            locks.share_again(_writers[key].fd)
            _writers[key].count += 1
        else:
            _writers[key] = _Writer(fd, drop)


def consolidate(path: Path) -> None:
    """Write every node's metadata into the root's zarr.json (zarr's consolidated metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "not in the v3 spec yet", ".ditf is no zarr node"
        zarr.consolidate_metadata(faults.wrap(LocalStore(path)))


def leave(path: Path) -> bool:
    """Uncount one writable store; the last one of the last writing process consolidates.

    True when consolidated metadata was written. With other writers active (their shared
    locks refuse our exclusive one) nothing is written: the last of them does it.
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
            if not entry.wrote:
                return False  # nothing written here (e.g. a refused command): the store stays as it was
            if not locks.try_exclusive(entry.fd):  # converts our shared lock if we are alone
                return False
            if (path / "zarr.json").is_file():
                consolidate(path)
            return True
        finally:
            os.close(entry.fd)


def close_writers() -> None:
    """Close every store this process still has open for writing (the CLI calls it as a command
    ends; at interpreter exit zarr's event loop is gone already, so atexit cannot do it)."""
    for key in list(_writers):
        with locks.GUARD:
            if key in _writers:
                _writers[key].count = 1
        try:
            leave(Path(key))
        except (OSError, DitfError):  # a store removed meanwhile: nothing left to consolidate
            pass
