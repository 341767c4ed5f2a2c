"""Where a store lives: the backend interface, its implementations and `--store` parsing.

The interface (`ReadBackend`, `Backend`) is declared one level down, in `store.backend_interface`
(the layout walker and the fault injector use it too, without importing any backend); `local` (a folder, NFS included) and
`object` (S3, GCS, Azure through fsspec) implement it; `published` (HTTP(S), the Hugging Face
Hub) implements `ReadBackend` only; `locations` parses a `--store` value.
`backend_for` picks the implementation for a parsed location.
"""

from __future__ import annotations

from pathlib import Path

from ..backend_interface import AnnouncingStore, Backend, ReadBackend, WriteHook
from .locations import is_read_only, is_remote, local_beside, store_location

__all__ = ["AnnouncingStore", "Backend", "ReadBackend", "WriteHook", "backend_for", "is_read_only", "is_remote", "local_beside",
           "store_location"]


def backend_for(location: str | Path, *, on_write: WriteHook | None = None) -> Backend | ReadBackend:
    """The backend of a location parsed by `store_location` (a Path, an object-store or a published URL)."""
    if is_read_only(location):
        from .published import PublishedBackend

        return PublishedBackend(str(location))
    if isinstance(location, Path):
        from .local import LocalBackend

        return LocalBackend(location, on_write=on_write)
    from .object import ObjectBackend

    return ObjectBackend(location, on_write=on_write)
