"""The backend interface: what the store needs from where it lives (a folder, a bucket, ...).

`ReadBackend` is what a reader needs (exists, list, read, a zarr store to read arrays through);
`Backend` adds the writes that make setups transactions (staging, publish, remove, lock). The
local folder and the object store implement both; a read-only backend (HTTP, a hub) implements
`ReadBackend` only and is refused for writing by `FeatureStore`.

Every write a backend makes, and every write of the zarr stores it hands out
(`AnnouncingStore`), is announced first to the backend's `on_write` callback (the writer
registry drops the consolidated copy of the metadata right before a writer's first write) and
then to `faults.before_write` (the crash tests' kill points).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore

#: called with a write's target right before the write (see the module's docstring)
WriteHook = Callable[[str], None]


@runtime_checkable
class ReadBackend(Protocol):
    """Where a store lives, read-only: the operations readers and the layout walker use."""

    #: True for object stores (no directory renames, no POSIX locks, no consolidated copy)
    remote: bool

    def where(self, rel: str) -> str:
        """A node's location as a user would write it (a path, or a URL)."""

    def exists(self, rel: str) -> bool:
        """Whether a file (or a folder / prefix) is at `rel`."""

    def is_dir(self, rel: str) -> bool:
        """Whether `rel` is a folder (a prefix holding objects)."""

    def list(self, rel: str) -> list[str]:
        """Names directly inside `rel`, sorted; empty when absent."""

    def read_text(self, rel: str) -> str:
        """A small file's text (metadata, leases)."""

    def zarr_store(self, rel: str = "", read_only: bool = False) -> Store:
        """A zarr store rooted at `rel` (arrays are read and written through zarr's own stores)."""

    def root_problem(self, read_only: bool) -> str | None:
        """Why the store cannot be opened here at all (no such folder, no bucket), or None."""

    def metadata_nodes(self) -> list[str]:
        """Every folder holding a zarr.json, relative to the root ("" for the root)."""


@runtime_checkable
class Backend(ReadBackend, Protocol):
    """A writable backend: single writes atomic, node setups published whole, writers excluded."""

    def write_text(self, rel: str, text: str) -> None:
        """One small file replaced atomically."""

    def create_root(self, metadata: bytes) -> None:
        """The store's root node as one transaction; a root created meanwhile by another process wins."""

    def new_staging(self) -> str:
        """A fresh folder under `.ditf/staging/` to build a node in."""

    def discard(self, rel: str) -> None:
        """Remove a staging folder (published or failed), quietly."""

    def publish(self, staged: str, node: str) -> bool:
        """Move a staged node to `node` whole; False when `node` exists already (another writer won)."""

    def remove(self, rel: str) -> None:
        """Remove a node so that it vanishes whole for every reader."""

    def lock(self, rel: str, refusal: str, wait: float) -> contextlib.AbstractContextManager[None]:
        """Exclusive right to write what `rel` names; `refusal` is the error when it stays taken."""

    def stray_creations(self) -> list[tuple[str, Callable[[], None]]]:
        """Leftovers of interrupted root creations beside the store, each with its removal."""

    def partial_files(self) -> list[tuple[str, Callable[[], None]]]:
        """Temp files of interrupted single-file writes, each with its removal."""


class AnnouncingStore(WrapperStore[Store]):
    """A zarr store whose every write (set, delete) is announced to `announce` first.

    zarr's own composition point (`WrapperStore`): the wrapped store does the work, this one
    only says what is about to be written, as ``<root>/<key>`` (``delete <root>/<key>``).
    """

    def __init__(self, store: Store, announce: WriteHook) -> None:
        super().__init__(store)
        self._announce = announce

    def _with_store(self, store: Store) -> AnnouncingStore:
        return type(self)(store, self._announce)

    def _where(self, key: str) -> str:
        root = getattr(self._store, "root", None) or getattr(self._store, "path", "")
        return f"{root}/{key}"

    async def set(self, key: str, value: Buffer) -> None:
        self._announce(self._where(key))
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        self._announce(self._where(key))
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._announce(f"delete {self._where(key)}")
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        self._announce(f"delete {self._where(prefix)}")
        await self._store.delete_dir(prefix)

    async def clear(self) -> None:
        self._announce(f"delete {self._where('')}")
        await self._store.clear()
