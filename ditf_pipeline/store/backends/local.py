"""A store in a local (or NFS) folder: directory renames publish a node, POSIX locks exclude writers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from zarr.abc.store import Store
from zarr.storage import LocalStore

from ...core.errors import DitfError
from .. import faults, layout, locks
from ..backend_interface import AnnouncingStore, WriteHook

__all__ = ["LocalBackend", "stray_roots"]

#: a store creation is built beside the store under this lock (held by its creator while it lives)
_CREATE_LOCK = f"{layout.LOCKS}/create.lock"
#: a creation folder without its lock is a creator killed in its first instant, or one in that instant
_LOCKLESS_AGE = 3600.0


def _strays(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.ditf-new-*"))


def _creator_gone(stray: Path) -> bool:
    """Whether the process that built `stray` is gone: its lock is free (the OS drops a dead
    process's POSIX locks), or it has none and is too old to be still in its first instant."""
    try:
        fd = os.open(stray / _CREATE_LOCK, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - stray.stat().st_mtime > _LOCKLESS_AGE
        except OSError:
            return False
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (frees our lock, if we took one)


def stray_roots(path: Path) -> list[Path]:
    """Remove the creations of the store at `path` whose creator died (built beside it); those removed."""
    removed = []
    for stray in _strays(path):
        if _creator_gone(stray):
            shutil.rmtree(stray, ignore_errors=True)
            removed.append(stray)
    return removed


def _list(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


class LocalBackend:
    """A store in a local (or NFS) folder.

    A node is published by one directory rename (atomic on POSIX file systems and on an NFS
    server); a node is removed by renaming it into `.ditf/trash` first, so it vanishes whole;
    zarr's `LocalStore` writes every single file atomically (temp file + rename).
    """

    remote = False

    def __init__(self, path: Path, *, on_write: WriteHook | None = None) -> None:
        """`on_write` is told of every write before it happens (see `backend_interface`)."""
        self.path = path
        self.on_write = on_write

    def __str__(self) -> str:
        return str(self.path)

    def _before_write(self, what: str) -> None:
        if self.on_write is not None:
            self.on_write(what)
        faults.before_write(what)

    def where(self, rel: str) -> str:
        return str(self.path / rel) if rel else str(self.path)

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def is_dir(self, rel: str) -> bool:
        return (self.path / rel).is_dir()

    def list(self, rel: str) -> list[str]:
        return _list(self.path / rel)

    def read_text(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def write_text(self, rel: str, text: str) -> None:
        """One file replaced atomically (temp file + rename)."""
        target = self.path / rel
        self._before_write(str(target))
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
        tmp.write_text(text)
        os.replace(tmp, target)

    def zarr_store(self, rel: str = "", read_only: bool = False) -> Store:
        store: Store = faults.wrap(LocalStore(self.path / rel, read_only=read_only))
        return store if read_only or self.on_write is None else AnnouncingStore(store, self.on_write)

    def root_problem(self, read_only: bool) -> str | None:
        if read_only and not self.path.exists():
            return f"store {self.path} does not exist"
        if self.path.exists() and not self.path.is_dir():
            return f"store {self.path} is not a directory"
        return None

    def _rename(self, src: Path, dst: Path) -> bool:
        """Publish a staged directory atomically; False when `dst` exists already (another writer won).

        An empty `dst` directory is replaced (rename(2) allows it): schema-1 stores left empty lock folders.
        """
        self._before_write(f"rename {src} -> {dst}")
        try:
            os.rename(src, dst)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise

    def create_root(self, metadata: bytes) -> None:
        """The root as one transaction: built beside the target, renamed into place.

        The creator holds a lock inside what it builds, so the next creator can tell a dead
        creator's leftover (removed) from a live one's (kept); renamed with the store, the lock
        file stays among the store's other lock files.
        """
        staged = self.path.parent / f".{self.path.name}.ditf-new-{uuid.uuid4().hex[:8]}"
        fd = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stray_roots(self.path)
            (staged / _CREATE_LOCK).parent.mkdir(parents=True)
            fd = os.open(staged / _CREATE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._before_write(f"{staged}/zarr.json")
            (staged / "zarr.json").write_bytes(metadata)
            if not self._rename(staged, self.path):
                shutil.rmtree(staged, ignore_errors=True)  # another process created the store first
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc
        finally:
            if fd is not None:
                os.close(fd)

    def new_staging(self) -> str:
        rel = f"{layout.STAGING}/{uuid.uuid4().hex}"
        (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
        return rel

    def discard(self, rel: str) -> None:
        shutil.rmtree(self.path / rel, ignore_errors=True)

    def publish(self, staged: str, node: str) -> bool:
        final = self.path / node
        if final.exists() and not (final / "zarr.json").exists() and any(n != layout.META for n in _list(final)):
            self.remove(node)  # a schema-1 half-setup: never committed
        return self._rename(self.path / staged, final)

    def remove(self, rel: str) -> None:
        """Remove a directory tree: renamed into the trash first, so the node vanishes whole."""
        path = self.path / rel
        if not path.exists():
            return
        self._before_write(f"remove {path}")
        trash = self.path / layout.TRASH
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / uuid.uuid4().hex
        os.rename(path, target)
        shutil.rmtree(target, ignore_errors=True)

    def lock(self, rel: str, refusal: str, wait: float) -> contextlib.AbstractContextManager[None]:
        return locks.lock_file(self.path / rel, refusal, wait)

    def metadata_nodes(self) -> list[str]:
        return sorted("/".join(meta.parent.relative_to(self.path).parts) for meta in self.path.rglob("zarr.json"))

    def stray_creations(self) -> list[tuple[str, Callable[[], None]]]:
        """Creations beside the store whose creator is gone (a live creator's is none of these)."""
        return [(str(s), functools.partial(shutil.rmtree, s, True)) for s in _strays(self.path) if _creator_gone(s)]

    def partial_files(self) -> list[tuple[str, Callable[[], None]]]:
        """Temp files of interrupted single-file writes (zarr's and ditf's temp file + rename)."""
        return [(str(p.relative_to(self.path)), functools.partial(p.unlink, missing_ok=True))
                for p in sorted(self.path.rglob("*.partial"))]
