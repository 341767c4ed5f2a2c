"""Fault injection for the crash tests: count every store write, SIGKILL right before the N-th.

Armed only by its environment, read here and nowhere else (or by a test calling `arm`):

* ``DITF_KILL_AT_WRITE=N``: the process SIGKILLs itself right before its N-th store write,
  after writing N to the file ``DITF_KILL_MARKER`` names (proof that it was still running);
* ``DITF_KILL_SIGNAL``: the signal sent instead of SIGKILL (``TERM``: what SLURM sends);
* ``DITF_WRITE_COUNT_FILE``: receives the number of writes at exit (to size those tests).

A write is every set or delete of a zarr store (through `FaultInjectingStore`, zarr's own
composition point) and every write a backend makes outside zarr (renames, removals, metadata
rewritten whole), which the backends announce to `before_write`. Unarmed, nothing is
installed: `wrap` returns zarr's store as it is and `before_write` returns at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from zarr.abc.store import Store

from .backend_interface import AnnouncingStore

__all__ = ["FaultInjectingStore", "WriteCounter", "arm", "before_write", "counter", "disarm", "wrap"]

_KILL_AT = "DITF_KILL_AT_WRITE"
_MARKER = "DITF_KILL_MARKER"
_SIGNAL = "DITF_KILL_SIGNAL"
_COUNT_FILE = "DITF_WRITE_COUNT_FILE"


@dataclass
class WriteCounter:
    """This process's store writes: counted, optionally traced, and killed at `kill_at`."""

    kill_at: int | None = None
    marker: str | None = None
    sig: int = signal.SIGKILL  # what it is killed with
    #: when a list, every write's target is appended (crash tests find where a setup ends)
    trace: list[str] | None = None
    seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def before(self, what: str) -> None:
        """Count the write about to happen; at the `kill_at`-th, leave the marker and die."""
        with self._lock:
            self.seen += 1
            n = self.seen
            if self.trace is not None:
                self.trace.append(what)
        if self.kill_at is not None and n == self.kill_at:
            if self.marker:
                Path(self.marker).write_text(str(n))
            os.kill(os.getpid(), self.sig)


class FaultInjectingStore(AnnouncingStore):
    """A zarr store whose every write is counted by the armed `WriteCounter` first (`before_write`)."""


_armed: WriteCounter | None = None
_read_by: int | None = None  # the process that read the environment (a forked child reads its own)


def _from_environment() -> WriteCounter | None:
    kill_at, count_file = os.environ.get(_KILL_AT), os.environ.get(_COUNT_FILE)
    if not kill_at and not count_file:
        return None
    armed = WriteCounter(kill_at=int(kill_at) if kill_at else None, marker=os.environ.get(_MARKER),
                         sig=signal.Signals[f"SIG{os.environ.get(_SIGNAL) or 'KILL'}"])
    if count_file:
        atexit.register(lambda: Path(count_file).write_text(str(armed.seen)))
    return armed


def counter() -> WriteCounter | None:
    """The armed counter of this process, or None (the environment is read once per process)."""
    global _armed, _read_by
    if _read_by != os.getpid():
        _read_by = os.getpid()
        _armed = _from_environment()
    return _armed


def arm(*, kill_at: int | None = None, trace: bool = False) -> WriteCounter:
    """Arm this process from Python (a forked test child): count from zero, kill at `kill_at`.

    The marker file is still taken from ``DITF_KILL_MARKER``.
    """
    global _armed, _read_by
    _read_by = os.getpid()
    _armed = WriteCounter(kill_at=kill_at, marker=os.environ.get(_MARKER), trace=[] if trace else None)
    return _armed


def disarm() -> None:
    """Stop counting (the environment is not read again in this process)."""
    global _armed, _read_by
    _read_by, _armed = os.getpid(), None


def before_write(what: str) -> None:
    """A backend's write outside zarr (rename, removal, a file rewritten) is about to happen."""
    armed = counter()
    if armed is not None:
        armed.before(what)


def wrap(store: Store) -> Store:
    """`store` with every write counted when armed; the store itself when not."""
    return store if counter() is None else FaultInjectingStore(store, before_write)
