"""Compare-and-swap writes on S3: a zarr store whose every write names the version it replaces.

Used for the one small node that every writer of an object store updates, the image index
(`FeatureStore.register_images`); the arrays of feature keys and predictions are written through
zarr's plain `FsspecStore`. A `ConditionalStore` starts from `versions`, the ETag of every
object under its root as one listing saw them. A write replaces an object only if it still has
the ETag this store last saw or wrote (`If-Match`), creates one only if it is still absent
(`If-None-Match: *`), and a removal deletes only the version seen (`If-Match` on DELETE). The
server checks the condition in the same request as the write, so nothing written by another
writer after the listing is ever overwritten: the write fails with `Conflict` instead.

Only S3 (s3fs) passes these conditions through fsspec; other object stores get no
`ConditionalStore` (`conditional_store` returns None) and keep the lease alone.
"""

from __future__ import annotations

from typing import Any

from zarr.core.buffer import Buffer
from zarr.storage import FsspecStore

from ..leases import precondition_failed  # the leases' conditional writes are refused the same way

__all__ = ["ConditionalStore", "Conflict", "precondition_failed"]


class Conflict(Exception):
    """Another writer changed (or created) an object of the node since this store listed it."""


class ConditionalStore(FsspecStore):
    """A zarr store whose writes succeed only on the objects' versions it knows (module docstring)."""

    def __init__(self, fs: Any, read_only: bool = False, path: str = "/",
                 allowed_exceptions: tuple[type[Exception], ...] | None = None,
                 versions: dict[str, str] | None = None) -> None:
        """`versions`: object key relative to `path` -> its ETag, for every object there now."""
        if allowed_exceptions is None:
            super().__init__(fs=fs, read_only=read_only, path=path)
        else:
            super().__init__(fs=fs, read_only=read_only, path=path, allowed_exceptions=allowed_exceptions)
        self.versions = dict(versions or {})

    def _object(self, key: str) -> str:
        return f"{self.path.rstrip('/')}/{key}"

    async def set(self, key: str, value: Buffer, byte_range: tuple[int, int] | None = None) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        if byte_range:
            raise NotImplementedError
        known = self.versions.get(key)
        condition = {"IfMatch": known} if known else {"IfNoneMatch": "*"}
        try:
            written = await self.fs._pipe_file(self._object(key), value.to_bytes(), **condition)
        except OSError as exc:
            if precondition_failed(exc):
                raise Conflict(key) from exc
            raise
        self.versions[key] = written["ETag"]

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if key not in self.versions:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._check_writable()
        known = self.versions.pop(key, None)
        if known is None:
            return  # absent when listed: whatever is there now is another writer's
        bucket, name, _ = self.fs.split_path(self._object(key))
        try:
            await self.fs._call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=known)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if precondition_failed(exc):
                raise Conflict(key) from exc
            raise

    async def delete_dir(self, prefix: str) -> None:
        for key in [k for k in self.versions if k.startswith(prefix.rstrip("/") + "/")]:
            await self.delete(key)
