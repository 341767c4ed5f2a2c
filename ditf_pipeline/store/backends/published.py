"""A published store, read-only: served over HTTP(S) or by the Hugging Face Hub (`ditf pack` makes one).

Neither can list a folder and neither may be written, so everything the store and its layout
walker ask about the tree is answered from the consolidated metadata in the root's zarr.json:
opening a published store costs that one read, and zarr reads the arrays' metadata from the same
copy. Chunks are fetched with range requests through zarr's `FsspecStore`; `PublishedStore`
retries a failed fetch and refuses a server that ignores a range (the bytes would be another
chunk's). Integrity is the store's own: every chunk carries a CRC32C checksum that zarr verifies
as it decodes, so a damaged or truncated chunk is the same one-line error naming the image as
in a local store. Only JSON metadata and array chunks are ever read: no code, no pickles.

Timeouts and retries (environment, read once per store): ``DITF_REMOTE_TIMEOUT`` seconds per
request (default 60) and ``DITF_REMOTE_RETRIES`` further tries of a failed request (default 3).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from typing import Any

import fsspec
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import FsspecStore, WrapperStore

from ...core.errors import DitfError
from ..failures import reason
from .locations import read_only_scheme

__all__ = ["PublishedBackend", "PublishedStore", "storage_options"]

_DEFAULT_TIMEOUT = 60.0
_DEFAULT_RETRIES = 3
#: not worth a retry: the object is absent, or the request itself is wrong
_ZARR_V2_METADATA = (".zgroup", ".zattrs", ".zmetadata", ".zarray")
_FINAL = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, KeyError, DitfError)


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError as exc:
        raise DitfError(f"{name}={os.environ[name]!r} is not a number") from exc


def storage_options(location: str) -> dict[str, Any]:
    """fsspec options of a published URL: the request timeout for HTTP(S) (the Hub's client has its own)."""
    scheme = read_only_scheme(location)
    if scheme not in ("http://", "https://"):
        return {}
    import aiohttp

    timeout = _setting("DITF_REMOTE_TIMEOUT", _DEFAULT_TIMEOUT)
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}


def _chained_options(location: str) -> dict[str, Any]:
    """The options of the URL's file system, keyed by protocol when a cache is chained in front."""
    options = storage_options(location)
    if "::" not in location or not options:
        return options
    return {location.rsplit("::", 1)[-1].split("://", 1)[0].lower(): options}


class PublishedStore(WrapperStore[Store]):
    """zarr's store of a published URL: the root metadata read once, reads retried, ranges checked."""

    def __init__(self, store: Store, root_metadata: bytes | None, where: str, retries: int,
                 whole_files: bool = False) -> None:
        """`whole_files`: a local cache in front, which fetches whole files anyway; ranges are cut here."""
        super().__init__(store)
        self._root_metadata = root_metadata
        self._where = where
        self._retries = retries
        self._whole_files = whole_files

    def _with_store(self, store: Store) -> PublishedStore:
        return type(self)(store, self._root_metadata, self._where, self._retries, self._whole_files)

    async def _retried(self, what: str, call: Any) -> Any:
        for attempt in range(self._retries + 1):
            try:
                return await call()
            except _FINAL:
                raise
            except Exception as exc:  # the server or the network: aiohttp, httpx and fsspec raise their own types
                if attempt == self._retries:
                    raise DitfError(f"store {self._where}: cannot read {what} after {attempt + 1} tries ({reason(exc)}); "
                                    "the server is unreachable or failing: retry later") from exc
                await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
        raise AssertionError("unreachable")

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if self._root_metadata is not None:
            if key == "zarr.json" and byte_range is None:
                return prototype.buffer.from_bytes(self._root_metadata)  # read once, when the store was opened
            if key in _ZARR_V2_METADATA:
                return None  # a zarr v3 store (its zarr.json says so): zarr's format probe need not ask the server
        if self._whole_files and byte_range is not None:
            whole = await self._retried(key, lambda: self._store.get(key, prototype))
            return None if whole is None else prototype.buffer.from_bytes(_cut(whole.to_bytes(), byte_range))
        value = await self._retried(key, lambda: self._store.get(key, prototype, byte_range))
        if value is not None:
            _check_range(f"{self._where}/{key}", byte_range, len(value))
        return value

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        """Whether a file is there, asked with a one-byte range: fsspec's HTTP `exists` GETs the
        whole file and takes any failure for "absent" (a committed chunk would then read as
        missing when the server merely failed)."""
        if key == "zarr.json" and self._root_metadata is not None:
            return True
        if self._whole_files:  # a cache fetches the whole file anyway, and keeps it for the read that follows
            return await self._retried(key, lambda: self._store.get(key, default_buffer_prototype())) is not None
        first = RangeByteRequest(0, 1)
        return await self._retried(key, lambda: self._store.get(key, default_buffer_prototype(), first)) is not None


def _cut(data: bytes, byte_range: ByteRequest) -> bytes:
    """The bytes of a range of a whole file."""
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix:]
    return data[byte_range.offset:]  # OffsetByteRequest


def _check_range(where: str, byte_range: ByteRequest | None, got: int) -> None:
    """A range answered with other than its length: the server ignored the Range header (sending
    the whole file) or cut the body short; either way the bytes are not the ones asked for."""
    if isinstance(byte_range, RangeByteRequest):
        wanted = byte_range.end - byte_range.start
    elif isinstance(byte_range, SuffixByteRequest):
        wanted = byte_range.suffix
    else:
        return
    if got != wanted:
        raise OSError(f"{where}: asked for {wanted} bytes, the server sent {got} "
                      "(it must answer HTTP Range requests, and the body must be complete)")


class PublishedBackend:
    """A store at an http(s):// or hf:// URL (optionally behind fsspec's simplecache:: / filecache::)."""

    remote = True

    def __init__(self, url: str) -> None:
        """Nothing is read until `root_problem` (opening the store) reads the root's zarr.json.

        Raises
        ------
        DitfError
            When the URL's fsspec file system is not installed or rejects the URL.
        """
        self.url = url
        self.scheme = read_only_scheme(url)
        self.retries = int(_setting("DITF_REMOTE_RETRIES", _DEFAULT_RETRIES))
        try:
            self.options = _chained_options(url)  # (imports aiohttp for http(s)://)
            self.fs, self.root = fsspec.url_to_fs(url, **self.options)
        except ImportError as exc:
            need = "aiohttp (pip install 'ditf[http]')" if self.scheme.startswith("http") else "its fsspec file system"
            raise DitfError(f"--store {url} needs {need}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise DitfError(f"--store {url}: {reason(exc)}") from exc
        self.root = self.root.rstrip("/")
        self._metadata: bytes | None = None
        self._nodes: set[str] = set()

    def __str__(self) -> str:
        return self.url

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def _refuse(self) -> DitfError:
        return DitfError(f"store {self.url} is read-only ({self.scheme} serves reads only): "
                         "write into a local store (match: --predictions-store PATH)")

    # ---- the one metadata read ----------------------------------------------------------------
    def _load(self) -> str | None:
        """Read the root's zarr.json and index its consolidated metadata; a problem as one line, or None."""
        if self._metadata is not None:
            return None
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                data = self.fs.cat_file(f"{self.root}/zarr.json")
                break
            except FileNotFoundError:
                return f"store {self.url} does not exist (no zarr.json there)"
            except Exception as exc:  # the server or the network
                last = exc
                if attempt < self.retries:
                    import time

                    time.sleep(min(0.5 * 2**attempt, 8.0))
        else:
            return f"store {self.url}: cannot read its zarr.json: {reason(last)}"
        try:
            meta = json.loads(data)
            nodes = meta["consolidated_metadata"]["metadata"]
        except (ValueError, KeyError, TypeError):
            return (f"store {self.url} has no consolidated metadata ({self.scheme} cannot list folders): "
                    "publish a store made by `ditf pack`")
        self._metadata = bytes(data)
        self._nodes = {str(name).strip("/") for name in nodes}
        for node in list(self._nodes):  # every folder above a node is a node of the walk too
            parts = node.split("/")
            self._nodes.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return None

    def root_problem(self, read_only: bool) -> str | None:
        if not read_only:
            return str(self._refuse())
        return self._load()

    # ---- the tree, from the consolidated metadata --------------------------------------------------
    def exists(self, rel: str) -> bool:
        self._load()
        rel = rel.strip("/")
        if rel in ("", "zarr.json"):
            return self._metadata is not None
        if rel.endswith("/zarr.json"):
            return rel[: -len("/zarr.json")] in self._nodes
        return rel in self._nodes

    def is_dir(self, rel: str) -> bool:
        return self.exists(rel) and not rel.endswith("zarr.json")

    def list(self, rel: str) -> list[str]:
        self._load()
        prefix = rel.strip("/") + "/" if rel.strip("/") else ""
        return sorted({node[len(prefix):].split("/")[0] for node in self._nodes if node.startswith(prefix) and node != prefix.rstrip("/")})

    def read_text(self, rel: str) -> str:
        if rel == "zarr.json" and self._metadata is not None:
            return self._metadata.decode()
        try:
            return self.fs.cat_file(f"{self.root}/{rel}").decode()
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise DitfError(f"store {self.url}: cannot read {rel}: {reason(exc)}") from exc

    def zarr_store(self, rel: str = "", read_only: bool = False) -> Store:
        if not read_only:
            raise self._refuse()
        if "::" in self.url:  # a cache in front: fsspec's caches are synchronous, zarr reads through its async wrapper
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs, path = fsspec.url_to_fs(self.where(rel), **self.options)
            inner: Store = FsspecStore(AsyncFileSystemWrapper(fs, asynchronous=True), path=path, read_only=True)
        else:
            inner = FsspecStore.from_url(self.where(rel), storage_options=self.options, read_only=True)
        return PublishedStore(inner, self._metadata if not rel else None, self.where(rel), self.retries,
                              whole_files="::" in self.url)

    def metadata_nodes(self) -> list[str]:
        self._load()
        return sorted({"", *self._nodes})
