"""POSIX locks on lock files: the exclusion between writers of a local (or NFS) store.

`fcntl.lockf` record locks on a descriptor opened read-write, not `flock`: NFS implements them
over the network and requires a writable descriptor, and the OS drops them when the process
dies, so a crash never leaves a stale lock. POSIX locks belong to a process, not to a
descriptor, so the same lock taken twice in one process would not exclude: `claim` keeps the
names this process holds (object-store leases use it too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import DitfError

__all__ = ["GUARD", "claim", "is_free", "lock_failure", "lock_file", "open_lock_file", "release", "share_again",
           "shared_lock_file", "try_exclusive", "wait_shared"]

#: guards `_held` and the writer registry (both per process)
GUARD = threading.RLock()
_held: set[str] = set()  # lock files (and leases) this process holds
_shared: dict[str, list[int]] = {}  # lock files this process holds shared -> [descriptor, holders]
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.ENOTSUP}
_TAKEN = (errno.EACCES, errno.EAGAIN)


def claim(name: str) -> bool:
    """Record that this process holds `name`; False when it does already (call under `GUARD`)."""
    if name in _held:
        return False
    _held.add(name)
    return True


def release(name: str) -> None:
    """Forget that this process holds `name`."""
    with GUARD:
        _held.discard(name)


def lock_failure(lock: Path, exc: OSError) -> DitfError:
    """The one error line for a lock that failed other than by being held."""
    if exc.errno in _NO_LOCKING:
        return DitfError(f"the file system holding {lock.parent} cannot lock files ({exc.strerror or exc}): ditf needs "
                         "POSIX locks (fcntl) to keep two writers apart; put the store on a file system that has them")
    return DitfError(f"cannot lock {lock}: {exc.strerror or exc}")


def open_lock_file(path: Path, store: Path) -> int:
    """A read-write descriptor of the lock file `path` (created with its folder)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise DitfError(f"cannot write to store {store}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def lock_file(path: Path, refusal: str, wait: float = 0.0) -> Iterator[None]:
    """Exclusive right to one lock file, for the duration of the `with` block.

    Without `wait` a held lock is refused at once (`refusal` is the error); with it the caller
    waits that many seconds. Within one process the same lock is refused too.
    """
    key = os.path.abspath(path)
    deadline = time.monotonic() + wait
    fd = None
    while fd is None:
        with GUARD:
            if key not in _held:
                candidate = open_lock_file(path, path.parent)
                try:
                    fcntl.lockf(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    claim(key)
                    fd = candidate
                except OSError as exc:
                    os.close(candidate)  # this process holds no lock on the file: closing frees nothing
                    if exc.errno not in _TAKEN:
                        raise lock_failure(path, exc) from None
        if fd is None:
            if time.monotonic() >= deadline:
                raise DitfError(refusal)
            time.sleep(0.1)
    try:
        yield
    finally:
        with GUARD:
            _held.discard(key)
            os.close(fd)


def wait_shared(fd: int, path: Path, wait: float) -> None:
    """Take a shared lock on `fd`, waiting up to `wait` seconds while an exclusive one is held.

    The descriptor is closed when the lock cannot be had.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in _TAKEN or time.monotonic() >= deadline:
                os.close(fd)
                raise lock_failure(path, exc) from None
            time.sleep(0.05)


def share_again(fd: int) -> None:
    """Take the shared lock on `fd` again (after another descriptor of the file was closed)."""
    fcntl.lockf(fd, fcntl.LOCK_SH)


def try_exclusive(fd: int) -> bool:
    """Turn this process's shared lock on `fd` exclusive if no other process holds one; never waits."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def shared_lock_file(path: Path, refusal: str, wait: float = 0.0) -> Iterator[None]:
    """A shared lock on one lock file for the `with` block: any number of holders, but none while
    another process holds it exclusively (waited for `wait` seconds, then `refusal`)."""
    key = os.path.abspath(path)
    with GUARD:
        if key in _shared:
            _shared[key][1] += 1
        else:
            fd = open_lock_file(path, path.parent)
            try:
                wait_shared(fd, path, wait)  # (closes fd when refused)
            except DitfError:
                raise DitfError(refusal) from None
            _shared[key] = [fd, 1]
            _held.add(key)
    try:
        yield
    finally:
        with GUARD:
            _shared[key][1] -= 1
            if _shared[key][1] == 0:
                os.close(_shared.pop(key)[0])
                _held.discard(key)


def is_free(path: Path, wait: float = 2.0) -> bool:
    """Whether no process holds a lock on the lock file `path` (an absent file is free).

    Probed by taking it exclusively for an instant; another probe holding it for that instant
    is waited out (`wait` seconds), a real holder is not. A file this process holds is not free
    (and is never probed: closing any descriptor of it would drop our own lock).
    """
    key = os.path.abspath(path)
    with GUARD:
        if key in _held:
            return False
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise lock_failure(path, exc) from None
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in _TAKEN:
                    raise lock_failure(path, exc) from None
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)  # (drops the instant's lock)
