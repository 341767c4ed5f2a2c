"""A store in object storage (S3, GCS, Azure) through fsspec; zarr's own `FsspecStore` for the arrays.

Object stores have single-object atomic puts but no directory rename and no locks, so a node is
published by copying its staged objects into place and writing the node's own zarr.json last (a
node without it is absent to every reader, and the next publish clears the leftovers); a removal
deletes that zarr.json first. Writers hold leases (`leases.ObjectLease`); on S3 the image index is
registered by compare-and-swap (`conditional`, `image_index.register_conditionally`).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore

from ...core.errors import DitfError
from .. import faults, layout
from ..failures import reason
from ..leases import LEASE_SECONDS, ObjectLease, holder_gone, is_live, passes_conditions
from ..backend_interface import AnnouncingStore, WriteHook
from .conditional import ConditionalStore
from .locations import OBJECT_SCHEMES

__all__ = ["ObjectBackend"]

#: fsspec options of the filesystems under zarr's stores: no listing cache (other processes write
#: the same prefixes), no shared instance (fsspec would hand back a filesystem made earlier in this
#: process for another endpoint or credentials)
_ZARR_FS_OPTIONS = {"use_listings_cache": False, "skip_instance_cache": True}


#: what a connection that never came about raises (botocore, aiohttp, the OS), by class name
_CONNECTION_FAILURES = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectTimeout",
                        "ServerTimeoutError", "ProxyConnectionError")


def _unreachable(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) says the endpoint could not be reached at all."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)) or type(exc).__name__ in _CONNECTION_FAILURES:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class ObjectBackend:
    """A store under an object-store URL (s3://bucket/prefix, gs://, az://)."""

    remote = True

    def __init__(self, url: str, *, on_write: WriteHook | None = None) -> None:
        """`on_write` is told of every write before it happens (see `backend_interface`).

        Raises
        ------
        DitfError
            When the URL's fsspec backend is not installed or rejects the URL.
        """
        import fsspec

        self.url = url
        self.on_write = on_write
        scheme = url.split("://", 1)[0]
        try:
            # no listing cache: other processes write the same prefixes
            self.fs, self.root = fsspec.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
        except ImportError as exc:
            raise DitfError(f"--store {url} needs {OBJECT_SCHEMES.get(scheme, 'an fsspec backend')}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise DitfError(f"--store {url}: {reason(exc)}") from exc
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def _before_write(self, what: str) -> None:
        if self.on_write is not None:
            self.on_write(what)
        faults.before_write(what)

    def key(self, rel: str) -> str:
        """The object key (bucket/prefix/rel) of `rel`."""
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one fsspec call; its failures (but not found / exists) become one error line."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, DitfError):
            raise
        except Exception as exc:  # botocore and friends: credentials, endpoint, permissions
            if _unreachable(exc):
                raise DitfError(f"store {self.url}: cannot reach the object store at {self.endpoint()} "
                                f"({reason(exc)}): check the endpoint (AWS_ENDPOINT_URL) and the network") from exc
            if isinstance(exc, OSError):
                raise DitfError(f"store {self.url}: cannot {what}: {exc.strerror or exc}") from exc
            raise DitfError(f"store {self.url}: cannot {what}: {reason(exc)}") from exc

    def endpoint(self) -> str:
        """The object store's address as configured (a custom endpoint), else the URL's scheme."""
        kwargs = getattr(self.fs, "client_kwargs", None) or {}
        return str(getattr(self.fs, "endpoint_url", None) or kwargs.get("endpoint_url")
                   or os.environ.get("AWS_ENDPOINT_URL") or f"the {self.url.split('://', 1)[0]}:// service")

    def exists(self, rel: str) -> bool:
        return bool(self.call("read", self.fs.exists, self.key(rel)))

    def is_dir(self, rel: str) -> bool:
        return bool(self.call("read", self.fs.isdir, self.key(rel)))

    def list(self, rel: str) -> list[str]:
        try:
            entries = self.call("list", self.fs.ls, self.key(rel), detail=False)
        except FileNotFoundError:
            return []
        prefix = self.key(rel).rstrip("/") + "/"
        return sorted({e.rstrip("/")[len(prefix):].split("/")[0] for e in entries if e.rstrip("/").startswith(prefix)} - {""})

    def read_text(self, rel: str) -> str:
        return self.call("read", self.fs.cat_file, self.key(rel)).decode()

    def write_text(self, rel: str, text: str) -> None:
        self._before_write(self.where(rel))
        self.call("write", self.fs.pipe_file, self.key(rel), text.encode())

    def zarr_store(self, rel: str = "", read_only: bool = False) -> Store:
        store: Store = faults.wrap(FsspecStore.from_url(self.where(rel), storage_options=_ZARR_FS_OPTIONS,
                                                        read_only=read_only))
        return store if read_only or self.on_write is None else AnnouncingStore(store, self.on_write)

    def conditional_store(self, rel: str) -> Store | None:
        """A zarr store rooted at `rel` whose every write is compare-and-swap against the objects
        that are there now (`conditional.ConditionalStore`: the versions are listed first); None
        where the object store's fsspec backend passes no conditions (all but S3)."""
        if not passes_conditions(self.fs):
            return None
        prefix = self.key(rel)
        try:
            found = self.call("list", self.fs.find, prefix, detail=True)
        except FileNotFoundError:
            found = {}
        versions = {name[len(prefix) + 1:]: str(info["ETag"]) for name, info in found.items()
                    if name.startswith(prefix + "/") and info.get("ETag")}
        base = FsspecStore.from_url(self.where(rel), storage_options=_ZARR_FS_OPTIONS)
        store: Store = faults.wrap(ConditionalStore(fs=base.fs, path=base.path, versions=versions))
        return store if self.on_write is None else AnnouncingStore(store, self.on_write)

    def root_problem(self, read_only: bool) -> str | None:
        bucket = self.root.split("/", 1)[0]
        # one call that raises what went wrong (the bucket probe below turns every failure into
        # "absent"): an endpoint that cannot be reached is named as such, not as a missing bucket
        try:
            self.call("read", self.fs.info, self.key("zarr.json"))
        except FileNotFoundError:
            pass
        except DitfError as exc:
            if _unreachable(exc.__cause__):
                raise
        try:
            if not self.call("read", self.fs.exists, bucket):
                return f"store {self.url}: bucket {bucket} does not exist (or these credentials cannot see it)"
        except FileNotFoundError:
            return f"store {self.url}: bucket {bucket} does not exist"
        if read_only and not self.exists("zarr.json"):
            return f"store {self.url} does not exist"
        return None

    def create_root(self, metadata: bytes) -> None:
        """The root is one object, created only if absent (a conditional put)."""
        self._before_write(self.where("zarr.json"))
        try:
            self.call("write", self.fs.pipe_file, self.key("zarr.json"), metadata, mode="create")
        except FileExistsError:
            pass  # another process created the store first

    def new_staging(self) -> str:
        """Named by its writer (host and process), so that another can tell when it died."""
        return f"{layout.STAGING}/{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex}"

    def _staging_dead(self, name: str) -> bool:
        """Whether the writer of staging folder `name` is gone: a dead process of this host, or
        nothing written there for two lease periods (a live writer renews its lease far more often)."""
        parts = name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and holder_gone(parts[0], int(parts[1])):
            return True
        try:
            infos = self.call("list", self.fs.find, self.key(f"{layout.STAGING}/{name}"), detail=True).values()
        except FileNotFoundError:
            return False
        stamps = [info.get("LastModified") or info.get("mtime") for info in infos]
        stamps = [s.timestamp() if hasattr(s, "timestamp") else float(s) for s in stamps if s is not None]
        return bool(stamps) and time.time() - max(stamps) > 2 * LEASE_SECONDS

    def sweep_dead_staging(self) -> list[str]:
        """Remove the staging folders of dead writers; those removed."""
        dead = [name for name in self.list(layout.STAGING) if self._staging_dead(name)]
        for name in dead:
            self.discard(f"{layout.STAGING}/{name}")
        return dead

    def discard(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError, DitfError):
            self.call("delete", self.fs.rm, self.key(rel), recursive=True)

    def _files(self, rel: str) -> list[str]:
        """Every object under `rel`, relative to it."""
        prefix = self.key(rel) + "/"
        try:
            found = self.call("list", self.fs.find, self.key(rel))
        except FileNotFoundError:
            return []
        return sorted(f[len(prefix):] for f in found if f.startswith(prefix))

    def publish(self, staged: str, node: str) -> bool:
        """Copy the staged node's objects into place, its zarr.json last (the commit mark).

        Objects under `node` without its zarr.json are the leftovers of an interrupted publish
        (never visible): they are removed first. False when the node exists (another writer won).
        """
        if self.exists(f"{node}/zarr.json"):
            return False
        if self._files(node):
            self.remove(node)
        for name in self._files(staged):
            if name != "zarr.json":
                self._before_write(f"copy {self.where(staged)}/{name} -> {self.where(node)}/{name}")
                self.call("write", self.fs.copy, self.key(f"{staged}/{name}"), self.key(f"{node}/{name}"))
        metadata = self.call("read", self.fs.cat_file, self.key(f"{staged}/zarr.json"))
        self._before_write(f"{self.where(node)}/zarr.json")
        try:
            self.call("write", self.fs.pipe_file, self.key(f"{node}/zarr.json"), metadata, mode="create")
        except FileExistsError:
            return False
        return True

    def remove(self, rel: str) -> None:
        """The node's zarr.json first (it vanishes for every reader), then its objects."""
        files = self._files(rel)
        if not files:
            return
        self._before_write(f"remove {self.where(rel)}")
        if "zarr.json" in files:
            with contextlib.suppress(FileNotFoundError):
                self.call("delete", self.fs.rm_file, self.key(f"{rel}/zarr.json"))
        with contextlib.suppress(FileNotFoundError):
            self.call("delete", self.fs.rm, self.key(rel), recursive=True)

    def lock(self, rel: str, refusal: str, wait: float) -> contextlib.AbstractContextManager[None]:
        """A lease object beside where the lock file would be (`.lease` for `.lock`)."""
        rel = rel.removesuffix(".lock") + ".lease"
        return ObjectLease(fs=self.fs, key=self.key(rel), name=f"{self.url}#{rel}", call=self.call,
                           refusal=refusal, wait=wait).held()

    def live_leases(self, prefix: str) -> list[str]:
        """The live leases whose node names begin with `prefix` (as `lock` is given them, before
        `layout.lock_path`), by object name: how a run sees which runs of the same node hold
        theirs (a shard job the whole-key run, and the other way round)."""
        stem = layout.lock_path(prefix).removesuffix(".lock")
        folder, name = stem.rsplit("/", 1)
        live = []
        for entry in self.list(folder):
            if not (entry.startswith(name) and entry.endswith(".lease")):
                continue
            try:
                raw = self.call("read", self.fs.cat_file, self.key(f"{folder}/{entry}"))
            except FileNotFoundError:
                continue  # released meanwhile
            if is_live(raw):
                live.append(entry)
        return live

    def metadata_nodes(self) -> list[str]:
        nodes = []
        for name in self._files(""):
            if name == "zarr.json":
                nodes.append("")
            elif name.endswith("/zarr.json"):
                nodes.append(name[: -len("/zarr.json")])
        return sorted(nodes)

    def stray_creations(self) -> list[tuple[str, Callable[[], None]]]:
        return []  # the root is one conditional put: nothing is built beside it

    def partial_files(self) -> list[tuple[str, Callable[[], None]]]:
        return []  # an object put is atomic: no temp files
