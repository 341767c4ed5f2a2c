"""The feature store: the only module that touches Zarr.

Layout (Zarr v3, schema 2, documented in stores/README.md)::

    <store>/                                   attrs: ditf_schema_version
      <dataset>/images/{key, size}             attrs: count (rows committed); row i of every array below is image key[i]
      <dataset>/<model>/k<k>/t<t>/             attrs: config (must match to write), provenance, modulation
          pre_adaln  (image, row, col, channel) float16, one chunk per image, zero padded
          grid       (image, axis)              int32, valid (rows, cols) of pre_adaln
          shift, scale, gate [, *_t, *_c]       (image, channel) float32
          complete   (image,)                   bool, written last: the commit mark of an image
          predictions/<scope>/<variant>/<protocol>/   {pair_id, pred, done}; scope = <split>-<pair list digest>
      prompts/<model>-<digest>/<text digest>/   one encoded prompt: attrs text, arrays per embedding
      .ditf/{locks,staging,trash}/              ditf's own bookkeeping: no zarr.json, so no zarr node

Crash safety, in three rules:

* every multi-write setup (the root, a feature key, a predictions group, a prompt, the image
  index group) is built under `.ditf/staging/` and renamed into place: a directory rename is
  atomic, so a node is either absent or complete;
* appending to the image index writes rows past the committed `count`, then `count` (one write);
* an image (a block of pairs) is committed by its `complete` (`done`) chunk, written after its
  data chunks; zarr's local store writes every single file atomically (temp file + rename).

So a SIGKILL before any single write leaves a store that the next plain run completes into the
same store an uninterrupted run writes (tests/test_kill_points.py tries every write of the setup).
Every chunk carries a crc32c checksum; a committed image whose chunk is missing or damaged is a
one-line error naming the image and array, never zeros or wrong numbers.

The filesystem-specific parts are three small functions (`_fs_rename`, `_fs_remove`, `_fs_lock`)
so that an object-store backend can replace them.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .. import SCHEMA_VERSION
from ..core.errors import DitfError
from ..core.keys import FeatureKey

#: every chunk is written, even one equal to the fill value (zarr skips those by default): a
#: missing chunk of a committed image then always means damage, never "all zeros"
zarr.config.set({"array.write_empty_chunks": True})
_COMPRESSOR = zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
#: every chunk is checksummed: a flipped byte is an error, never a wrong number
_CHECKSUM = zarr.codecs.Crc32cCodec()
_COMPRESSED = (_COMPRESSOR, _CHECKSUM)
_PLAIN = (_CHECKSUM,)
_INDEX_CHUNK = 4096
#: images per file of the small per-image arrays (grid, AdaLN vectors, complete): zarr shards.
#: A shard is rewritten whole when one of its images is committed (one atomic file replace),
#: so two writers must never share one: `--shard i/N` hands out rows in blocks of this size.
#: (DITF_ROWS_PER_SHARD sets it for new keys: tests use small blocks so shards interleave)
ROWS_PER_SHARD = int(os.environ.get("DITF_ROWS_PER_SHARD") or 32)
#: ditf's bookkeeping inside the store (locks, staging, trash): no zarr.json, so zarr skips it
_META = ".ditf"
#: the dtype of every feature array; anything else in the metadata means it was damaged
_FEATURE_DTYPES = {"pre_adaln": "float16", "grid": "int32", "complete": "bool"}
_MODULATION_DTYPE = "float32"
#: how long a writer waits for the prompt-cache lock held by a concurrent extract of the same model
_INDEX_LOCK_WAIT = 300.0  # seconds: a registration appends a few rows; only a stuck writer holds it longer
_PROMPT_LOCK_WAIT = 600.0


# ---- the lowest level: every write passes here --------------------------------------------------
_KILL_AT = int(os.environ["DITF_KILL_AT_WRITE"]) if os.environ.get("DITF_KILL_AT_WRITE") else None
_WRITE_LOG = os.environ.get("DITF_WRITE_COUNT_FILE")
_writes_seen = 0
_writes_lock = threading.Lock()
#: when a list, every write's target is appended (crash tests find where the setup ends)
_trace: list[str] | None = None


def _write_point(what: str = "") -> None:
    """Called before every single write to a store (chunk, metadata, rename, delete).

    Crash tests set DITF_KILL_AT_WRITE=N: the process then SIGKILLs itself right before its N-th
    write, after leaving a marker (DITF_KILL_MARKER) that proves it was still running.
    DITF_WRITE_COUNT_FILE receives the number of writes at exit (to size those tests).
    """
    global _writes_seen
    if _WRITERS:
        _note_write(what)
    with _writes_lock:
        _writes_seen += 1
        n = _writes_seen
        if _trace is not None:
            _trace.append(what)
    if _KILL_AT is not None and n == _KILL_AT:
        marker = os.environ.get("DITF_KILL_MARKER")
        if marker:
            Path(marker).write_text(str(n))
        os.kill(os.getpid(), signal.SIGKILL)


if _WRITE_LOG:
    atexit.register(lambda: Path(_WRITE_LOG).write_text(str(_writes_seen)))


class _Announced:
    """Every write of a zarr store announced to `_write_point` first (mixed into zarr's stores)."""

    def _where(self) -> str:
        return str(getattr(self, "root", None) or getattr(self, "path", ""))

    async def set(self, key, value, *args, **kwargs) -> None:
        _write_point(f"{self._where()}/{key}")
        await super().set(key, value, *args, **kwargs)

    async def set_if_not_exists(self, key, value) -> None:
        _write_point(f"{self._where()}/{key}")
        await super().set_if_not_exists(key, value)

    async def delete(self, key) -> None:
        _write_point(f"delete {self._where()}/{key}")
        await super().delete(key)

    async def delete_dir(self, prefix) -> None:
        _write_point(f"delete {self._where()}/{prefix}")
        await super().delete_dir(prefix)


class _Store(_Announced, LocalStore):
    """zarr's local store (each chunk written atomically: temp file + rename)."""


class _ObjectStore(_Announced, FsspecStore):
    """zarr's fsspec store for s3://, gs://, az:// (each object put is atomic)."""


# ---- filesystem-specific parts (an object-store backend replaces these) --------------------------
def _fs_rename(src: Path, dst: Path) -> bool:
    """Publish a staged directory atomically; False when `dst` exists already (another writer won).

    An empty `dst` directory is replaced (rename(2) allows it): v1 stores left empty lock folders.
    """
    _write_point(f"rename {src} -> {dst}")
    try:
        os.rename(src, dst)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def _fs_remove(path: Path, trash: Path) -> None:
    """Remove a directory tree: renamed into the trash first, so the node vanishes whole."""
    if not path.exists():
        return
    _write_point(f"remove {path}")
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / uuid.uuid4().hex
    os.rename(path, target)
    shutil.rmtree(target, ignore_errors=True)


def _fs_list(path: Path) -> list[str]:
    """Names inside a node's folder (the doctor walks the tree even where zarr cannot)."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


_HELD: set[str] = set()  # lock files this process holds (POSIX locks are per process, not per descriptor)
_HELD_GUARD = threading.Lock()
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.ENOTSUP}


def _lock_failure(lock: Path, exc: OSError) -> DitfError:
    """The one error line for a lock that failed other than by being held."""
    if exc.errno in _NO_LOCKING:
        return DitfError(f"the file system holding {lock.parent} cannot lock files ({exc.strerror or exc}): ditf needs "
                         "POSIX locks (fcntl) to keep two writers apart; put the store on a file system that has them")
    return DitfError(f"cannot lock {lock}: {exc.strerror or exc}")


@contextlib.contextmanager
def _fs_lock(path: Path, refusal: str, wait: float = 0.0):
    """Exclusive right to one lock file: `fcntl.lockf` on a descriptor opened read-write.

    POSIX record locks (not `flock`): NFS implements them over the network and requires a
    writable descriptor; the OS drops them when the process dies, so a crash never leaves a
    stale lock. Within one process the same lock is refused too (POSIX locks would not be).
    Without `wait` a held lock is refused at once; with it the caller waits that many seconds.
    """
    key = os.path.abspath(path)
    deadline = time.monotonic() + wait
    fd = None
    while fd is None:
        with _HELD_GUARD:
            if key not in _HELD:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    candidate = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                except OSError as exc:
                    raise DitfError(f"cannot write to store {path.parent}: {exc.strerror or exc}") from exc
                try:
                    fcntl.lockf(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _HELD.add(key)
                    fd = candidate
                except OSError as exc:
                    os.close(candidate)  # this process holds no lock on the file: closing frees nothing
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise _lock_failure(path, exc) from None
        if fd is None:
            if time.monotonic() >= deadline:
                raise DitfError(refusal)
            time.sleep(0.1)
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD.discard(key)
            os.close(fd)


# ---- consolidated metadata: one read opens a store, and it is never stale ------------------------
#: every process writing a local store holds a shared lock on this file while it may write;
#: consolidated metadata is written only under the exclusive lock, i.e. by the last writer
_WRITERS_LOCK = "writers.lock"
_WRITERS_WAIT = 600.0


@dataclass
class _Writer:
    """This process as one writer of one local store (POSIX locks belong to processes)."""

    fd: int  # the descriptor holding our shared lock on `.ditf/locks/writers.lock`
    names: tuple[str, ...]  # the store's folder as given and absolute: how write targets name it
    drop: Callable[[], None]  # drops the consolidated copy; run right before the first write
    count: int = 1  # FeatureStore objects of this process open for writing
    wrote: bool = False  # anything written since we joined (a refused command writes nothing)


_WRITERS: dict[str, _Writer] = {}  # absolute store folder -> this process as its writer


def _note_write(what: str) -> None:
    """Before the first write to a store: drop its consolidated copy (called by `_write_point`)."""
    for writer in list(_WRITERS.values()):
        if not writer.wrote and any(name in what for name in writer.names):
            writer.wrote = True
            writer.drop()  # (its own write finds `wrote` set: no recursion)


def _join_writers(path: Path, drop: Callable[[], None]) -> None:
    """Count this process among the store's writers (a shared `lockf` lock, once per process).

    Waits while another process holds the exclusive lock (it is writing consolidated metadata).
    """
    key = os.path.abspath(path)
    with _HELD_GUARD:
        if key in _WRITERS:
            _WRITERS[key].count += 1
            return
    lock = path / _META / "locks" / _WRITERS_LOCK
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise DitfError(f"cannot write to store {path}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + _WRITERS_WAIT
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() >= deadline:
                os.close(fd)
                raise _lock_failure(lock, exc) from None
            time.sleep(0.05)
    with _HELD_GUARD:
        if key in _WRITERS:  # another thread of this process joined meanwhile
            os.close(fd)  # (POSIX locks are per process: closing any descriptor of the file drops ours)
            fcntl.lockf(_WRITERS[key].fd, fcntl.LOCK_SH)
            _WRITERS[key].count += 1
        else:
            _WRITERS[key] = _Writer(fd, tuple(dict.fromkeys((str(path), key))), drop)


def _consolidate_local(path: Path) -> None:
    """Write every node's metadata into the root's zarr.json (zarr's consolidated metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "not in the v3 spec yet", ".ditf is no zarr node"
        zarr.consolidate_metadata(_Store(path))


def close_writers() -> None:
    """Close every store this process still has open for writing (the CLI calls it as a command
    ends; at interpreter exit zarr's event loop is gone already, so atexit cannot do it)."""
    for key in list(_WRITERS):
        with _HELD_GUARD:
            if key in _WRITERS:
                _WRITERS[key].count = 1
        try:
            _leave_writers(Path(key))
        except (OSError, DitfError):  # a store removed meanwhile: nothing left to consolidate
            pass


def _leave_writers(path: Path) -> bool:
    """Uncount one writable store; the last one of the last writing process consolidates.

    True when consolidated metadata was written. With other writers active (their shared
    locks refuse our exclusive one) nothing is written: the last of them does it.
    """
    key = os.path.abspath(path)
    with _HELD_GUARD:
        entry = _WRITERS.get(key)
        if entry is None:
            return False
        entry.count -= 1
        if entry.count > 0:
            return False
        del _WRITERS[key]
        fd = entry.fd
        try:
            if not entry.wrote:
                return False  # nothing written here (e.g. a refused command): the store stays as it was
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # converts our shared lock if we are alone
            except OSError:
                return False
            if (path / "zarr.json").is_file():
                _consolidate_local(path)
            return True
        finally:
            os.close(fd)


# ---- where a store lives: a local folder or an object store --------------------------------------
#: URL schemes served by fsspec object-store backends (installed as extras: s3fs, gcsfs, adlfs)
_OBJECT_SCHEMES = {"s3": "s3fs (pip install 'ditf[s3]')", "s3a": "s3fs (pip install 'ditf[s3]')",
                   "gs": "gcsfs (pip install 'ditf[gcs]')", "gcs": "gcsfs (pip install 'ditf[gcs]')",
                   "az": "adlfs (pip install 'ditf[azure]')", "abfs": "adlfs (pip install 'ditf[azure]')",
                   "abfss": "adlfs (pip install 'ditf[azure]')"}
#: how long an object-store writer's lease lasts without a heartbeat (seconds)
_LEASE_SECONDS = float(os.environ.get("DITF_LEASE_SECONDS") or 60)


def is_remote(store: str | Path) -> bool:
    """Whether `--store` names an object store (s3://, gs://, az://) rather than a local folder."""
    text = str(store)
    return "://" in text and text.split("://", 1)[0].lower() != "file"


def store_location(store: str | Path) -> str | Path:
    """A `--store` value parsed once: a local Path (plain paths and file:// URLs) or an object-store URL."""
    text = str(store)
    if "://" not in text:
        return Path(text)
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return Path(rest)
    if scheme not in _OBJECT_SCHEMES:
        raise DitfError(f"--store {text}: unknown URL scheme {scheme}:// (use a path, file://, s3://, gs:// or az://)")
    if not rest.strip("/"):
        raise DitfError(f"--store {text}: name a bucket (and a prefix), e.g. {scheme}://bucket/ditf.zarr")
    return f"{scheme}://{rest.rstrip('/')}"


def local_beside(store: str | Path, suffix: str, replace_suffix: bool = True) -> Path:
    """A local folder for files that accompany a store (DAVIS masks, probe heads).

    Beside a local store: `<store>` with its suffix replaced by (or extended with) `suffix`.
    An object store has no local "beside": the folder goes under `DITF_RESULTS_ROOT` (default
    ./stores), named after the URL, e.g. s3://bucket/run/ditf.zarr -> stores/s3_bucket_run_ditf.zarr.results.
    """
    location = store_location(store)
    if isinstance(location, Path):
        return location.with_suffix(suffix) if replace_suffix else location.with_name(location.name + suffix)
    flat = location.replace("://", "_").replace("/", "_")
    return Path(os.environ.get("DITF_RESULTS_ROOT") or "stores") / f"{flat}{suffix}"


def store_exists(store: str | Path) -> bool:
    """Whether a ditf store (its root zarr.json) is at `store` (a path or a URL)."""
    return _backend(store_location(store)).exists("zarr.json")


def store_folder_exists(store: str | Path) -> bool:
    """Whether anything is at `store` (a folder; under an object-store prefix, any object)."""
    return _backend(store_location(store)).exists("")


class _LocalBackend:
    """A store in a local (or NFS) folder: directory renames publish, POSIX locks exclude."""

    remote = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def where(self, rel: str) -> str:
        return str(self.path / rel) if rel else str(self.path)

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def is_dir(self, rel: str) -> bool:
        return (self.path / rel).is_dir()

    def list(self, rel: str) -> list[str]:
        return _fs_list(self.path / rel)

    def read_text(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def write_text(self, rel: str, text: str) -> None:
        """One file replaced atomically (temp file + rename)."""
        target = self.path / rel
        _write_point(str(target))
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
        tmp.write_text(text)
        os.replace(tmp, target)

    def zarr_store(self, rel: str = "", read_only: bool = False):
        return _Store(self.path / rel, read_only=read_only)

    def root_problem(self, read_only: bool) -> str | None:
        if read_only and not self.path.exists():
            return f"store {self.path} does not exist"
        if self.path.exists() and not self.path.is_dir():
            return f"store {self.path} is not a directory"
        return None

    def create_root(self, metadata: bytes) -> None:
        """The root as one transaction: built beside the target, renamed into place."""
        staged = self.path.parent / f".{self.path.name}.ditf-new-{uuid.uuid4().hex[:8]}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staged.mkdir()
            _write_point(f"{staged}/zarr.json")
            (staged / "zarr.json").write_bytes(metadata)
            if not _fs_rename(staged, self.path):
                shutil.rmtree(staged, ignore_errors=True)  # another process created the store first
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc

    def new_staging(self) -> str:
        rel = f"{_META}/staging/{uuid.uuid4().hex}"
        (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
        return rel

    def discard(self, rel: str) -> None:
        shutil.rmtree(self.path / rel, ignore_errors=True)

    def publish(self, staged: str, node: str) -> bool:
        final = self.path / node
        if final.exists() and not (final / "zarr.json").exists() and any(n != _META for n in _fs_list(final)):
            self.remove(node)  # a schema-1 half-setup: never committed
        return _fs_rename(self.path / staged, final)

    def remove(self, rel: str) -> None:
        _fs_remove(self.path / rel, self.path / _META / "trash")

    def lock(self, rel: str, refusal: str, wait: float):
        return _fs_lock(self.path / rel, refusal, wait)

    def metadata_nodes(self) -> list[str]:
        """Every folder holding a zarr.json, relative to the root ("" for the root)."""
        return sorted("/".join(meta.parent.relative_to(self.path).parts) for meta in self.path.rglob("zarr.json"))

    def stray_creations(self) -> list[tuple[str, Callable[[], None]]]:
        return [(str(s), functools.partial(shutil.rmtree, s, True))
                for s in self.path.parent.glob(f".{self.path.name}.ditf-new-*")]

    def partial_files(self) -> list[tuple[str, Callable[[], None]]]:
        """Temp files of interrupted single-file writes (zarr's and ditf's temp file + rename)."""
        return [(str(p.relative_to(self.path)), functools.partial(p.unlink, missing_ok=True))
                for p in sorted(self.path.rglob("*.partial"))]


class _ObjectBackend:
    """A store in object storage through fsspec (zarr's own FsspecStore for the arrays).

    Object stores have single-object atomic puts but no directory rename and no locks, so a node
    is published by copying its staged objects into place and writing the node's own zarr.json
    last (a node without it is absent to every reader, and the next publish clears the
    leftovers); a removal deletes that zarr.json first. Writers hold leases (`_ObjectLease`).
    """

    remote = True

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url
        scheme = url.split("://", 1)[0]
        try:
            # no listing cache: other processes write the same prefixes
            self.fs, self.root = fsspec.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
        except ImportError as exc:
            raise DitfError(f"--store {url} needs {_OBJECT_SCHEMES.get(scheme, 'an fsspec backend')}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise DitfError(f"--store {url}: {_reason(exc)}") from exc
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, DitfError):
            raise
        except OSError as exc:
            raise DitfError(f"store {self.url}: cannot {what}: {exc.strerror or exc}") from exc
        except Exception as exc:  # botocore and friends: credentials, endpoint, permissions
            raise DitfError(f"store {self.url}: cannot {what}: {_reason(exc)}") from exc

    def exists(self, rel: str) -> bool:
        return bool(self._call("read", self.fs.exists, self._key(rel)))

    def is_dir(self, rel: str) -> bool:
        return bool(self._call("read", self.fs.isdir, self._key(rel)))

    def list(self, rel: str) -> list[str]:
        try:
            entries = self._call("list", self.fs.ls, self._key(rel), detail=False)
        except FileNotFoundError:
            return []
        prefix = self._key(rel).rstrip("/") + "/"
        return sorted({e.rstrip("/")[len(prefix):].split("/")[0] for e in entries if e.rstrip("/").startswith(prefix)} - {""})

    def read_text(self, rel: str) -> str:
        return self._call("read", self.fs.cat_file, self._key(rel)).decode()

    def write_text(self, rel: str, text: str) -> None:
        _write_point(self.where(rel))
        self._call("write", self.fs.pipe_file, self._key(rel), text.encode())

    def zarr_store(self, rel: str = "", read_only: bool = False):
        # no listing cache: other processes write the same prefixes
        return _ObjectStore.from_url(self.where(rel), storage_options={"use_listings_cache": False}, read_only=read_only)

    def root_problem(self, read_only: bool) -> str | None:
        bucket = self.root.split("/", 1)[0]
        try:
            if not self._call("read", self.fs.exists, bucket):
                return f"store {self.url}: bucket {bucket} does not exist (or these credentials cannot see it)"
        except FileNotFoundError:
            return f"store {self.url}: bucket {bucket} does not exist"
        if read_only and not self.exists("zarr.json"):
            return f"store {self.url} does not exist"
        return None

    def create_root(self, metadata: bytes) -> None:
        """The root is one object, created only if absent (a conditional put)."""
        _write_point(self.where("zarr.json"))
        try:
            self._call("write", self.fs.pipe_file, self._key("zarr.json"), metadata, mode="create")
        except FileExistsError:
            pass  # another process created the store first

    def new_staging(self) -> str:
        return f"{_META}/staging/{uuid.uuid4().hex}"

    def discard(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError, DitfError):
            self._call("delete", self.fs.rm, self._key(rel), recursive=True)

    def _files(self, rel: str) -> list[str]:
        """Every object under `rel`, relative to it."""
        prefix = self._key(rel) + "/"
        try:
            found = self._call("list", self.fs.find, self._key(rel))
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
        files = self._files(staged)
        for name in files:
            if name != "zarr.json":
                _write_point(f"copy {self.where(staged)}/{name} -> {self.where(node)}/{name}")
                self._call("write", self.fs.copy, self._key(f"{staged}/{name}"), self._key(f"{node}/{name}"))
        metadata = self._call("read", self.fs.cat_file, self._key(f"{staged}/zarr.json"))
        _write_point(f"{self.where(node)}/zarr.json")
        try:
            self._call("write", self.fs.pipe_file, self._key(f"{node}/zarr.json"), metadata, mode="create")
        except FileExistsError:
            return False
        return True

    def remove(self, rel: str) -> None:
        """The node's zarr.json first (it vanishes for every reader), then its objects."""
        files = self._files(rel)
        if not files:
            return
        _write_point(f"remove {self.where(rel)}")
        if "zarr.json" in files:
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", self.fs.rm_file, self._key(f"{rel}/zarr.json"))
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", self.fs.rm, self._key(rel), recursive=True)

    def lock(self, rel: str, refusal: str, wait: float):
        return _ObjectLease(self, rel.removesuffix(".lock") + ".lease", refusal, wait).held()

    def metadata_nodes(self) -> list[str]:
        nodes = []
        for name in self._files(""):
            if name == "zarr.json":
                nodes.append("")
            elif name.endswith("/zarr.json"):
                nodes.append(name[: -len("/zarr.json")])
        return sorted(nodes)

    def stray_creations(self) -> list[tuple[str, Callable[[], None]]]:
        return []

    def partial_files(self) -> list[tuple[str, Callable[[], None]]]:
        return []  # an object put is atomic: no temp files


class _ObjectLease:
    """The right to write one node of an object store: a lease object created by a conditional put.

    The lease holds an owner id and an expiry; a heartbeat thread pushes the expiry forward while
    the holder runs. Another writer is refused while the lease is live; it may take over a lease
    that expired (its holder died or hung) or whose holder is a dead process on this host.
    Taking over is read, compare, delete, conditional create: see stores/README.md for the race
    that remains.
    """

    def __init__(self, backend: _ObjectBackend, rel: str, refusal: str, wait: float) -> None:
        self.backend, self.rel, self.refusal, self.wait = backend, rel, refusal, wait
        self.key = backend._key(rel)
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.ttl = _LEASE_SECONDS
        self.lost = False

    # Lease reads and writes do not pass `_write_point`: the heartbeat's timing would make the
    # write counts of the kill tests depend on the clock.
    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": os.uname().nodename, "pid": os.getpid(),
                           "expires": time.time() + self.ttl}).encode()

    def _read(self) -> tuple[bytes, dict] | None:
        try:
            raw = self.backend._call("read", self.backend.fs.cat_file, self.key)
        except FileNotFoundError:
            return None
        try:
            return raw, json.loads(raw)
        except ValueError:
            return raw, {}  # a damaged lease counts as expired

    @staticmethod
    def _stale(lease: dict) -> bool:
        if float(lease.get("expires", 0)) < time.time():
            return True
        if lease.get("host") == os.uname().nodename and isinstance(lease.get("pid"), int):
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                return True  # its process died on this host: no need to wait for the expiry
            except PermissionError:
                pass
        return False

    def _try(self) -> bool:
        fs = self.backend.fs
        try:
            self.backend._call("take a lease", fs.pipe_file, self.key, self._body(), mode="create")
            return True
        except FileExistsError:
            pass
        found = self._read()
        if found is None or not self._stale(found[1]):
            return False
        again = self._read()  # the same stale lease still there: remove it, then race for a new one
        if again is None or again[0] != found[0]:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.backend._call("remove a stale lease", fs.rm_file, self.key)
        try:
            self.backend._call("take a lease", fs.pipe_file, self.key, self._body(), mode="create")
            return True
        except FileExistsError:
            return False

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                found = self._read()
                if found is None or found[1].get("owner") != self.owner:
                    self.lost = True
                    warnings.warn(f"ditf: the lease {self.key} was taken over by another writer", stacklevel=1)
                    return
                self.backend.fs.pipe_file(self.key, self._body())
            except Exception:  # a transient network error: try again at the next beat
                continue

    @contextlib.contextmanager
    def held(self):
        name = f"{self.backend.url}#{self.rel}"
        deadline = time.monotonic() + self.wait
        while True:
            with _HELD_GUARD:
                mine = name not in _HELD and self._try()
                if mine:
                    _HELD.add(name)
            if mine:
                break
            if time.monotonic() >= deadline:
                raise DitfError(self.refusal)
            time.sleep(min(1.0, max(self.wait / 20, 0.1)))
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True, name=f"ditf-lease {self.rel}")
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with _HELD_GUARD:
                _HELD.discard(name)
            found = self._read() if not self.lost else None
            if found is not None and found[1].get("owner") == self.owner:
                with contextlib.suppress(Exception):
                    self.backend.fs.rm_file(self.key)


def _backend(location: str | Path):
    return _LocalBackend(location) if isinstance(location, Path) else _ObjectBackend(location)


# ---- small helpers ------------------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _writes(method):
    """Turn an OS-level write failure (disk full, read-only, permissions) into one clear line.

    Whatever was committed before stays readable: chunks are written atomically and an image
    is committed only by its `complete` flag, so a failed write leaves at most an uncommitted
    image behind.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            where = getattr(self, "path", None) or getattr(getattr(self, "group", None), "store_path", "the store")
            reason = exc.strerror or str(exc)
            raise DitfError(f"cannot write to store {where}: {reason}; data committed so far is intact, rerun to resume") from exc

    return wrapper


def _reads(what: str):
    """Turn any failure to read a node (corrupt metadata, damaged chunk) into one line naming it."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (DitfError, OSError):
                raise
            except Exception as exc:
                where = getattr(self, "path", "the store")
                raise DitfError(f"store {where}: {what} is damaged ({_reason(exc)}): run `ditf doctor --repair`") from exc

        return wrapper

    return decorate


def _root_metadata() -> bytes:
    """The root node's zarr.json as zarr writes it (it holds only the schema version)."""
    memory = zarr.storage.MemoryStore()
    zarr.create_group(store=memory, attributes={"ditf_schema_version": SCHEMA_VERSION})
    return sync(memory.get("zarr.json", zarr.core.buffer.default_buffer_prototype())).to_bytes()


def feature_path(dataset: str, model: str, k: int, t: int) -> str:
    """The group of a feature key (see `FeatureKey.path`)."""
    return FeatureKey(dataset, model, k, t).path


def prediction_scope(split: str | None, pair_ids: Sequence[str]) -> str:
    """Name of the predictions of one pair list: ``<split>-<digest of the pair ids>``.

    Keyed by split and pair list, the predictions of every split of a benchmark (and of a
    changed pair list) live side by side in one store instead of refusing each other.
    """
    digest = hashlib.sha256("\n".join(map(str, pair_ids)).encode()).hexdigest()[:8]
    return f"{split or 'default'}-{digest}"


#: settings recorded in `config` that do not change the numbers (so a v1 key can be resumed)
_IGNORED_CONFIG = {"schema_version"}


def config_differences(stored: Mapping, wanted: Mapping) -> list[str]:
    """'name: stored -> wanted' for every setting that differs."""
    keys = sorted((set(stored) | set(wanted)) - _IGNORED_CONFIG)
    return [f"{key}: {stored.get(key)!r} -> {wanted.get(key)!r}" for key in keys if stored.get(key) != wanted.get(key)]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _checksummed(array: zarr.Array) -> bool:
    """Schema 2+ arrays: crc32c on every chunk (directly, or on the inner chunks of a shard)."""
    for codec in array.metadata.codecs:
        if isinstance(codec, zarr.codecs.Crc32cCodec):
            return True
        if isinstance(codec, zarr.codecs.ShardingCodec):
            return any(isinstance(inner, zarr.codecs.Crc32cCodec) for inner in codec.codecs)
    return False


def _file_rows(array: zarr.Array) -> int:
    """Rows (images or pairs) per stored file: the chunk, or the shard of a sharded array."""
    return int(array.metadata.chunk_grid.chunk_shape[0])


def _file_key(array: zarr.Array, row: int) -> str:
    """The store key of the file (chunk, or shard) holding `row` of `array`."""
    coords = (row // _file_rows(array),) + (0,) * (array.ndim - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def _chunk_exists(array: zarr.Array, row: int) -> bool:
    """Whether the file holding `row` (its chunk, or its shard) was written (a missing one would
    read as fill values).

    Only schema 2+ arrays (checksummed) write every chunk; schema 1 skipped chunks equal to the
    fill value, so there a missing chunk is taken as written.
    """
    if not _checksummed(array):
        return True
    return bool(sync(array.store_path.store.exists(_file_key(array, row))))


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeatureStore:
    """A Zarr group holding cached DiT features, prompt embeddings and predictions."""

    def __init__(self, path: str | Path, read_only: bool = False, consolidated: bool = True) -> None:
        """`path`: a folder (or file:// URL), or an object-store URL (s3://bucket/prefix, gs://, az://).

        `self.path` is a Path for a local store and the URL (str) for an object store. A reader
        uses the root's consolidated metadata when there is some, unless `consolidated=False`
        (`ditf doctor` reads every node's own).
        """
        self.path = store_location(path)
        self.backend = _backend(self.path)
        self.remote = self.backend.remote
        self.read_only = read_only
        problem = self.backend.root_problem(read_only)
        if problem:
            raise DitfError(problem)
        if not self.backend.exists("zarr.json"):
            if any(name != _META for name in self.backend.list("")):
                raise DitfError(f"{self.path} is not a ditf store (a non-empty folder without zarr.json): "
                                "refusing to write into it; pass a new path or an existing store")
            if read_only:
                raise DitfError(f"store {self.path} is not a zarr store (no zarr.json)")
            self._create_root()
        self._writing = False
        if not read_only:
            # a writer joins the store's writers: from here until `close()` nobody else writes a
            # consolidated copy, and ours is dropped right before our first write (a command
            # refused before writing leaves the store as it was)
            if self.remote:
                self._drop_consolidated()  # no shared locks on object stores: drop at once
            else:
                _join_writers(self.path, self._drop_consolidated)
                self._writing = True
        try:
            # readers use the consolidated metadata when there is some (one read on a network file
            # system); a writer never does: it must see what other writers did since
            self.root = zarr.open_group(store=self.backend.zarr_store("", read_only), mode="r" if read_only else "r+",
                                        use_consolidated=None if read_only and consolidated else False)
            version = self.root.attrs.get("ditf_schema_version")
        except Exception as exc:  # zarr raises several types for damaged metadata
            raise DitfError(f"cannot open store {self.path}: its zarr.json is damaged ({_reason(exc)}): "
                            "run `ditf doctor --repair`") from exc
        if version is not None and version > SCHEMA_VERSION:
            raise DitfError(
                f"store {self.path} uses schema version {version}; this ditf reads up to {SCHEMA_VERSION}: upgrade ditf"
            )
        self.schema_version = version or 1
        if not read_only and self.schema_version < SCHEMA_VERSION:
            self.migrate()

    def _create_root(self) -> None:
        """The root as one transaction (a renamed folder, or one conditional put)."""
        self.backend.create_root(_root_metadata())

    def _drop_consolidated(self) -> None:
        """Rewrite the root's zarr.json without its consolidated metadata, if it has any."""
        try:
            meta = json.loads(self.backend.read_text("zarr.json"))
        except (OSError, ValueError):
            return  # unreadable: opening reports it (and `ditf doctor --repair` rewrites it)
        if isinstance(meta, dict) and meta.get("consolidated_metadata") is not None:
            meta.pop("consolidated_metadata")
            try:
                self.backend.write_text("zarr.json", json.dumps(meta, indent=2))
            except OSError as exc:
                raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc

    @_writes
    def close(self) -> bool:
        """End this writer: the last writer of a local store writes consolidated metadata.

        Every node's metadata is then in the root's zarr.json, so a reader opens the store with
        one read. Any writer drops that copy when it opens the store and keeps others from
        writing a new one until it closes (the CLI closes what is left as a command ends; a
        killed process just leaves none), so the copy never misses a change. Object stores have
        no shared locks and are not consolidated. Returns True when it was written.
        """
        if not self._writing:
            return False
        self._writing = False
        return _leave_writers(self.path)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @_writes
    def migrate(self) -> list[str]:
        """Bring an older store to schema 3 in place (additive: older data stays as it is).

        Schema 2 added the image index's commit mark (`count`, set to today's rows); schema-1
        predictions and prompt caches are still read where they are. Schema 3 shards the small
        per-image arrays of new keys; schema-2 keys keep one chunk per image and are read and
        resumed as they are. The version is written last.
        """
        done = []
        for name in self._dataset_names():
            group = self._group(f"{name}/images")
            if group is not None and "count" not in group.attrs and "key" in group:
                group.attrs["count"] = int(group["key"].shape[0])
                done.append(f"{name}/images: commit mark count={group.attrs['count']} added")
        self.root.attrs["ditf_schema_version"] = SCHEMA_VERSION
        self.schema_version = SCHEMA_VERSION
        return done + [f"schema version set to {SCHEMA_VERSION}"]

    # ---- nodes ------------------------------------------------------------------------------
    def _group(self, path: str) -> zarr.Group | None:
        """The group at `path`, None if absent; damaged metadata is one clear error."""
        try:
            node = self.root[path]
        except KeyError:
            return None
        except Exception as exc:
            raise DitfError(f"store {self.path}: the metadata of {path} is damaged ({_reason(exc)}): "
                            "run `ditf doctor --repair`") from exc
        if not isinstance(node, zarr.Group):
            raise DitfError(f"store {self.path}: {path} is an array where a group belongs")
        return node

    def has(self, path: str) -> bool:
        try:
            self.root[path]
            return True
        except KeyError:
            return False

    def _dataset_names(self) -> list[str]:
        return [name for name in self.backend.list("") if name not in (_META, "prompts")
                and self.backend.exists(f"{name}/zarr.json")]

    @contextlib.contextmanager
    def _staged(self, attributes: Mapping | None = None):
        """A new group under `.ditf/staging/`, to be built completely and then `_publish`ed."""
        staged = self.backend.new_staging()
        try:
            yield staged, zarr.create_group(store=self.backend.zarr_store(staged),
                                            attributes=_jsonable(dict(attributes or {})))
        finally:
            self.backend.discard(staged)  # local: published (gone already) or failed; object store: the copy's source

    def _publish(self, staged: str, node: str) -> bool:
        """Move a staged group to `node` whole (parents created first, each one atomic write).

        Locally a directory rename; on object storage a copy with the node's zarr.json last.
        """
        self._require_parents(node)
        return self.backend.publish(staged, node)

    def _require_parents(self, node: str) -> None:
        """Create the groups above `node`, top down: a kill leaves no group without its parent.

        (zarr's `require_group("a/b/c")` writes c before a and b, and a later call that finds
        c stops there, leaving a and b missing and c unreachable.)
        """
        parts = node.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if self._group(prefix) is None:
                try:
                    self.root.require_group(prefix)
                except zarr.errors.ContainsGroupError:
                    pass  # another writer (a concurrent --shard) created it in between: it exists, as wanted

    def delete(self, path: str) -> None:
        """Remove a node whole (renamed out of the hierarchy first: a kill leaves it or nothing)."""
        try:
            self.backend.remove(path)
        except OSError as exc:
            raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc

    # ---- image index --------------------------------------------------------------------------
    @_writes
    def register_images(self, dataset: str, keys: Sequence[str], sizes: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Add images to the dataset's index (existing rows keep their position); key -> row.

        New rows are written past the committed `count`, then `count` is raised: a kill in
        between leaves rows that the next call simply overwrites.
        """
        node = f"{dataset}/images"
        # short, so concurrent shards queue here instead of failing
        with self.lock(node, f"another process is registering {dataset} images in {self.path}: retry",
                       wait=_INDEX_LOCK_WAIT):
            if self._group(node) is None:
                with self._staged({"count": 0}) as (staged, group):
                    group.create_array("key", shape=(0,), chunks=(_INDEX_CHUNK,), dtype=str, fill_value="",
                                       compressors=_PLAIN, dimension_names=("image",))
                    group.create_array("size", shape=(0, 2), chunks=(_INDEX_CHUNK, 2), dtype="int32", fill_value=0,
                                       compressors=_PLAIN, dimension_names=("image", "wh"))
                    self._publish(staged, node)
            group = self._group(node)
            rows = self.image_rows(dataset)
            new = [(key, size) for key, size in zip(keys, sizes) if key not in rows]
            if new:
                start = len(rows)
                key_array, size_array = group["key"], group["size"]
                key_array.resize((start + len(new),))
                size_array.resize((start + len(new), 2))
                key_array[start:] = np.array([key for key, _ in new], dtype=object).astype(str)
                size_array[start:] = np.array([size for _, size in new], dtype="int32").reshape(-1, 2)
                group.attrs["count"] = start + len(new)  # the commit mark of these rows
                rows.update({key: start + i for i, (key, _) in enumerate(new)})
            return rows

    @_reads("the image index")
    def image_rows(self, dataset: str) -> dict[str, int]:
        group = self._group(f"{dataset}/images")
        if group is None or "key" not in group:
            return {}
        count = int(group.attrs.get("count", group["key"].shape[0]))  # schema 1: no commit mark
        keys = group["key"][:count] if count else []
        return {str(key): row for row, key in enumerate(keys)}

    def image_key(self, dataset: str, row: int) -> str:
        """The key of one row (for error messages: a damaged image is named, not numbered)."""
        try:
            return str(self.root[f"{dataset}/images/key"][row])
        except Exception:
            return f"row {row}"

    # ---- features -----------------------------------------------------------------------------
    @_writes
    def open_features(
        self,
        dataset: str,
        model: str,
        k: int,
        t: int,
        config: Mapping | None = None,
        provenance: Mapping | None = None,
        n_images: int | None = None,
        grid_max: tuple[int, int] | None = None,
        hidden_size: int | None = None,
        modulation_names: Iterable[str] = (),
        adaln: bool = True,
    ) -> "FeatureArrays":
        """Open (or, with `config`, create/validate) the arrays of one (dataset, model, k, t).

        Writing into an existing key with a different `config` is refused, naming the settings
        that differ: silently mixing two configurations in one key would corrupt every score.
        With `adaln=False` (models without AdaLN: DINOv2, the SD UNet) no shift/scale/gate arrays
        are created, only `modulation_names` (normally none). A new key (arrays and attributes)
        is built in staging and renamed into place: it appears whole or not at all.
        """
        path = feature_path(dataset, model, k, t)
        group = self._group(path)
        if config is None:
            if group is None or "complete" not in group:
                raise DitfError(f"store {self.path} has no features for {path}: run `ditf extract` first")
            return self._feature_arrays(group, path, dataset)
        config = _jsonable(config)
        if group is not None and "config" in group.attrs:
            differences = config_differences(group.attrs["config"], config)
            if differences:
                raise DitfError(
                    f"store {self.path} key {path} was written with another configuration ("
                    + "; ".join(differences)
                    + "): use another --store or the stored settings"
                )
        if self.read_only:
            raise DitfError(f"store {self.path} is read-only")
        if group is not None and ("complete" not in group or "config" not in group.attrs):
            if "complete" in group and np.asarray(group["complete"][:]).any():
                raise DitfError(f"store {self.path} key {path} has committed images but no configuration "
                                "(an interrupted schema-1 setup): run `ditf doctor --repair`")
            self.delete(path)  # an uncommitted schema-1 half-setup: discard and build anew
            group = None
        if group is None:
            rows, cols = grid_max
            names = (["shift", "scale", "gate"] if adaln else []) + [*modulation_names]
            attrs = {"config": config, "provenance": _jsonable(provenance or {}), "modulation": names}
            with self._staged(attrs) as (staged, new):
                new.create_array(
                    "pre_adaln", shape=(n_images, rows, cols, hidden_size), chunks=(1, rows, cols, hidden_size),
                    dtype="float16", fill_value=0, compressors=_COMPRESSED, dimension_names=("image", "row", "col", "channel"),
                )
                # the small per-image arrays: one chunk per image inside one file per ROWS_PER_SHARD
                # images (zarr's sharding codec), so an image adds one file (its pre_adaln chunk)
                # plus a fraction; see stores/README.md "Files per image"
                new.create_array("grid", shape=(n_images, 2), chunks=(1, 2), shards=(ROWS_PER_SHARD, 2), dtype="int32",
                                 fill_value=0, compressors=_PLAIN, dimension_names=("image", "axis"))
                for name in names:
                    # NaN fill: a committed image whose vector is absent from its shard is an error, never zeros
                    new.create_array(name, shape=(n_images, hidden_size), chunks=(1, hidden_size),
                                     shards=(ROWS_PER_SHARD, hidden_size), dtype="float32", fill_value=np.nan,
                                     compressors=_PLAIN, dimension_names=("image", "channel"))
                new.create_array("complete", shape=(n_images,), chunks=(1,), shards=(ROWS_PER_SHARD,), dtype=bool,
                                 fill_value=False, compressors=_PLAIN, dimension_names=("image",))
                self._publish(staged, path)
            group = self._group(path)
        arrays = self._feature_arrays(group, path, dataset)
        if n_images is not None and n_images > arrays.n_images:
            arrays.grow(n_images)
        return arrays

    @_reads("a feature key's metadata")
    def _feature_arrays(self, group: zarr.Group, path: str, dataset: str) -> "FeatureArrays":
        arrays = FeatureArrays(group, path, image_key=functools.partial(self.image_key, dataset))
        arrays.check_schema()
        return arrays

    def lock(self, node: str, refusal: str, wait: float = 0.0):
        """Exclusive, non-blocking right to write one node; `refusal` is the error if taken.

        Locally a lock file under `.ditf/locks/` (see `_fs_lock`): the OS drops it when the
        process dies, so a crashed run never leaves a stale lock. On object storage a lease
        object there (see `_ObjectLease`): it expires unless its holder's heartbeat renews it.
        """
        name = node.strip("/").replace("/", "%") + ".lock"
        return self.backend.lock(f"{_META}/locks/{name}", refusal, wait)

    def writer_lock(self, dataset: str, model: str, k: int, t: int, shard: str | None = None, wait: float = 0.0):
        """One extract per key at a time: a second writer is refused, not interleaved.

        With `shard` ("i/N", `--shard`) the lock is that shard's alone: shards write disjoint
        images, so any number of them may run at once, but never the same shard twice.
        """
        key = feature_path(dataset, model, k, t)
        if shard is None:
            return self.lock(key, f"another process is extracting {key} into {self.path}: wait for it to finish "
                                  "(then rerun: completed images are skipped) or use another --store", wait)
        index, count = shard.split("/")
        return self.lock(f"{key}%shard-{index}-of-{count}",
                         f"another process is extracting shard {shard} of {key} into {self.path}: wait for it to finish")

    def _subgroups(self, path: str) -> list[tuple[str, zarr.Group]]:
        group = self.root if not path else self._group(path)
        if group is None:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `.ditf` is not a zarr node, by design
            try:
                return sorted(group.groups())
            except Exception as exc:
                raise DitfError(f"store {self.path}: the metadata of a node under {path or '/'} is damaged "
                                f"({_reason(exc)}): run `ditf doctor --repair`") from exc

    def feature_keys(self, dataset: str | None = None) -> list[tuple[str, str, int, int]]:
        """Every (dataset, model, k, t) holding features."""
        found = []
        for ds_name in self._dataset_names():
            if dataset is not None and ds_name != dataset:
                continue
            for model_name in self.backend.list(ds_name):
                for k_name in self.backend.list(f"{ds_name}/{model_name}"):
                    for t_name in self.backend.list(f"{ds_name}/{model_name}/{k_name}"):
                        if (k_name.startswith("k") and k_name[1:].isdigit() and t_name.startswith("t")
                                and t_name[1:].isdigit()
                                and self.backend.exists(f"{ds_name}/{model_name}/{k_name}/{t_name}/complete/zarr.json")):
                            found.append((ds_name, model_name, int(k_name[1:]), int(t_name[1:])))
        return sorted(found)

    def find_feature_key(self, dataset: str, model: str, k: int | None = None, t: int | None = None) -> tuple[int, int]:
        """(k, t) to use when the user gave none: the only one stored for (dataset, model)."""
        keys = [(kk, tt) for ds, m, kk, tt in self.feature_keys(dataset) if m == model]
        matching = [(kk, tt) for kk, tt in keys if (k is None or kk == k) and (t is None or tt == t)]
        if len(matching) == 1:
            return matching[0]
        if not matching:
            wanted = f"{dataset}/{model}" + (f"/k{k}" if k is not None else "") + (f"/t{t}" if t is not None else "")
            have = ", ".join(f"k{kk}/t{tt}" for kk, tt in keys) or "nothing"
            raise DitfError(f"store {self.path} has no features for {wanted} (it has {have} for {dataset}/{model}): run `ditf extract`")
        raise DitfError(
            f"store {self.path} holds several keys for {dataset}/{model} ("
            + ", ".join(f"k{kk}/t{tt}" for kk, tt in matching) + "): pass --k and --t"
        )

    # ---- prompt cache -----------------------------------------------------------------------
    def prompt_cache(self, model: str, identity: Mapping) -> "PromptCache":
        digest = hashlib.sha256(json.dumps(_jsonable(identity), sort_keys=True).encode()).hexdigest()[:10]
        return PromptCache(self, f"prompts/{model}-{digest}", _jsonable(identity))

    # ---- predictions --------------------------------------------------------------------------
    def _prediction_path(self, feature_key: tuple[str, str, int, int], name: str, scope: str | None) -> str | None:
        """Where predictions `name` live: under `scope`, else the only scope holding them (or schema 1's place)."""
        base = f"{feature_path(*feature_key)}/predictions"
        if scope is not None:
            path = f"{base}/{scope}/{name}"
            if self._group(path) is not None:
                return path
            if self._group(f"{base}/{name}") is not None:
                return f"{base}/{name}"  # schema 1: predictions of one pair list, unscoped
        split = scope.rsplit("-", 1)[0] + "-" if scope else ""  # e.g. a reader of one category's pairs
        found = [f"{base}/{s}/{name}" for s, _ in self._subgroups(base)
                 if s.startswith(split) and self._group(f"{base}/{s}/{name}") is not None
                 and "done" in self._group(f"{base}/{s}/{name}")]
        if not scope and self._group(f"{base}/{name}") is not None:
            found.append(f"{base}/{name}")
        if len(found) > 1:
            raise DitfError(f"store {self.path} holds predictions {name} of several splits or pair lists "
                            f"({', '.join(p.split('/')[-3] for p in found)}): pass --split, or run `ditf match` on this pair list")
        return found[0] if found else None

    @_writes
    def open_predictions(
        self,
        feature_key: tuple[str, str, int, int],
        name: str,
        pair_ids: Sequence[str] | None = None,
        max_kps: int | None = None,
        attrs: Mapping | None = None,
        block: int = 256,
        value_shape: tuple[int, ...] | None = None,
        scope: str | None = None,
        overwrite: bool = False,
    ) -> "PredictionArrays":
        """Predictions of one variant/protocol of one pair list, next to the features they came from.

        One row per pair id: (max_kps, 2) keypoints by default, or `value_shape` (e.g. a 3x3
        homography for HPatches). `scope` (see `prediction_scope`) keeps the pair lists of
        several splits apart; writers get it from the pair ids when not given. A new group is
        built in staging and renamed into place.
        """
        value_shape = tuple(value_shape) if value_shape is not None else (max_kps, 2)
        if pair_ids is None:
            path = self._prediction_path(feature_key, name, scope)
            group = self._group(path) if path else None
            if group is None or "done" not in group:
                where = f"{feature_path(*feature_key)}/predictions/{scope + '/' if scope else ''}{name}"
                raise DitfError(f"store {self.path} has no predictions {where}: run `ditf match` first")
            return PredictionArrays(group, path)
        pair_ids = [str(p) for p in pair_ids]
        scope = scope or prediction_scope(None, pair_ids)
        path = f"{feature_path(*feature_key)}/predictions/{scope}/{name}"
        attrs = _jsonable(attrs or {})
        group = self._group(path)
        if group is not None and overwrite:
            self.delete(path)
            group = None
        if group is not None:
            stored = PredictionArrays(group, path)
            differences = config_differences(stored.config, attrs)
            if differences or stored.pair_ids != pair_ids or group["pred"].shape[1:] != value_shape:
                reason = "; ".join(differences) if differences else "the pair list changed"
                raise DitfError(
                    f"predictions {path} exist with other settings ({reason}): pass --overwrite to recompute them"
                )
            return stored
        n = len(pair_ids)
        with self._staged({"config": attrs}) as (staged, new):
            new.create_array("pair_id", shape=(n,), chunks=(max(n, 1),), dtype=str, fill_value="",
                             compressors=_PLAIN, dimension_names=("pair",))
            new["pair_id"][:] = np.array(pair_ids, dtype=object).astype(str)
            dims = ("pair", "keypoint", "xy") if len(value_shape) == 2 and value_shape[1] == 2 else (
                "pair", *(f"axis{i}" for i in range(len(value_shape))))
            new.create_array(
                "pred", shape=(n, *value_shape), chunks=(block, *value_shape), dtype="float32", fill_value=np.nan,
                compressors=_COMPRESSED, dimension_names=dims,
            )
            new.create_array("done", shape=(n,), chunks=(block,), dtype=bool, fill_value=False,
                             compressors=_PLAIN, dimension_names=("pair",))
            self._publish(staged, path)
        return PredictionArrays(self._group(path), path)

    def results_dir(self, feature_key: tuple[str, str, int, int], name: str) -> Path:
        """Folder for results that are files, not arrays (DAVIS masks): beside the store.

        An object store has no "beside": such results go to a local folder named after the URL
        (see `local_beside`), so masks stay files other tools can read.
        """
        return local_beside(self.path, ".results") / feature_path(*feature_key) / name

    def prediction_groups(self, dataset: str, model: str, k: int, t: int) -> list[tuple[str, "PredictionArrays"]]:
        """Every stored predictions group of a feature key, as ("[scope/]variant/protocol", arrays)."""
        base = f"{feature_path(dataset, model, k, t)}/predictions"
        found = []
        for first, first_group in self._subgroups(base):
            for second, second_group in self._subgroups(f"{base}/{first}"):
                if "done" in second_group:  # schema 1: variant/protocol
                    found.append((f"{first}/{second}", PredictionArrays(second_group, f"{base}/{first}/{second}")))
                    continue
                for third, third_group in self._subgroups(f"{base}/{first}/{second}"):
                    if "done" in third_group:
                        path = f"{base}/{first}/{second}/{third}"
                        found.append((f"{first}/{second}/{third}", PredictionArrays(third_group, path)))
        return found


@dataclass
class FeatureArrays:
    """The arrays of one (dataset, model, k, t)."""

    group: zarr.Group
    path: str
    image_key: Callable[[int], str] | None = field(default=None, repr=False)

    @property
    def n_images(self) -> int:
        return self.group["complete"].shape[0]

    @property
    def config(self) -> dict:
        return dict(self.group.attrs.get("config", {}))

    @property
    def hidden_size(self) -> int:
        """Channels of the cached features (D)."""
        return int(self.group["pre_adaln"].shape[-1])

    @property
    def modulation_names(self) -> list[str]:
        return list(self.group.attrs.get("modulation", ["shift", "scale", "gate"]))

    def _name(self, row: int) -> str:
        return self.image_key(row) if self.image_key is not None else f"row {row}"

    def check_schema(self) -> None:
        """Every array present with its dtype: damaged metadata must not reinterpret the bytes."""
        expected = {**_FEATURE_DTYPES, **{name: _MODULATION_DTYPE for name in self.modulation_names}}
        for name, dtype in expected.items():
            if name not in self.group:
                raise DitfError(f"{self.path}: array {name} is missing: run `ditf doctor --repair`")
            stored = str(self.group[name].dtype)
            if stored != dtype:
                raise DitfError(f"{self.path}: array {name} has dtype {stored} in its metadata, not {dtype}: "
                                "the metadata is damaged; run `ditf doctor --repair`")

    def grow(self, n_images: int) -> None:
        """More rows; `complete` last, so its length never exceeds any other array's."""
        for name in ["pre_adaln", "grid", *self.modulation_names, "complete"]:
            array = self.group[name]
            if array.shape[0] != n_images:
                array.resize((n_images, *array.shape[1:]))

    def complete(self) -> np.ndarray:
        try:
            return np.asarray(self.group["complete"][:], dtype=bool)
        except Exception as exc:
            raise DitfError(f"store: {self.path}: array complete is damaged ({_reason(exc)}): run `ditf doctor --repair`") from exc

    @_writes
    def write_image(self, row: int, pre_adaln: np.ndarray, modulation: Mapping[str, np.ndarray]) -> None:
        """Write one image's features, then mark it complete (the commit point)."""
        rows, cols = pre_adaln.shape[:2]
        capacity = self.group["pre_adaln"].shape[1:3]
        if rows > capacity[0] or cols > capacity[1]:
            raise DitfError(f"feature grid {rows}x{cols} exceeds the store's {capacity[0]}x{capacity[1]} for {self.path}")
        padded = np.zeros(self.group["pre_adaln"].shape[1:], dtype=np.float16)
        padded[:rows, :cols] = pre_adaln
        self.group["pre_adaln"][row] = padded
        self.group["grid"][row] = np.array([rows, cols], dtype="int32")
        for name in self.modulation_names:
            self.group[name][row] = np.asarray(modulation[name], dtype=np.float32)
        self.group["complete"][row] = True

    def clear_complete(self, rows: Iterable[int]) -> None:
        """Un-commit images (the doctor's repair of a damaged image): the next extract redoes them."""
        for row in rows:
            self.group["complete"][int(row)] = False

    @_writes
    def drop_rows(self, committed: Iterable[int], name: str, row: int) -> None:
        """Un-commit `committed`, then delete the file of array `name` holding `row` (a damaged
        shard: zarr cannot write into a shard whose index it cannot read)."""
        self.clear_complete(committed)
        array = self.group[name]
        sync(array.store_path.store.delete(_file_key(array, row)))

    @property
    def massive_channels(self) -> list[int] | None:
        """The channel set `ditf analyze` recorded, if any."""
        stored = self.group.attrs.get("massive_channels")
        return None if stored is None else [int(c) for c in stored]

    @_writes
    def set_massive_channels(self, channels: Sequence[int], info: Mapping | None = None) -> None:
        """Record the detected massive channels (attribute `massive_channels`, read by `--channels auto`).

        `info` (e.g. the criterion and the images it was computed on) goes to `massive_channels_info`.
        """
        attrs = {"massive_channels": sorted(int(c) for c in channels)}
        if info is not None:
            attrs["massive_channels_info"] = _jsonable(info)
        # one metadata write: `attrs.update` would write zarr.json once per key, and a kill between
        # the two would leave the channels without their info (found by tests/test_kill_points.py)
        self.group.update_attributes(attrs)

    def _read_row(self, name: str, row: int, selection: tuple = ()) -> np.ndarray:
        """One image's slice of one array; a missing or damaged chunk is an error naming both."""
        try:
            array = self.group[name]
            if not _chunk_exists(array, row):
                raise DitfError(f"store: {self.path}: the {name} chunk of committed image {self._name(row)} is missing; "
                                "run `ditf doctor --repair`, then rerun `ditf extract`")
            return array[(row, *selection)]
        except DitfError:
            raise
        except Exception as exc:
            raise DitfError(f"store: {self.path}: the {name} chunk of image {self._name(row)} is damaged ({_reason(exc)}); "
                            "run `ditf doctor --repair`, then rerun `ditf extract`") from exc

    def read_image(self, row: int, vectors: Iterable[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(pre_adaln of the valid grid, float16 (rows, cols, D); modulation name -> (D,)).

        `vectors` names the AdaLN vectors to read (default: all stored); a variant needs at most
        two, and each is a read of its own.
        """
        try:
            committed = bool(self.group["complete"][row])
        except Exception as exc:
            raise DitfError(f"store: {self.path}: array complete is damaged ({_reason(exc)}): run `ditf doctor --repair`") from exc
        if not committed:
            raise DitfError(f"image {self._name(row)} of {self.path} is not extracted yet: run `ditf extract`")
        rows, cols = (int(v) for v in self._read_row("grid", row))
        capacity = self.group["pre_adaln"].shape[1:3]
        if not (0 < rows <= capacity[0] and 0 < cols <= capacity[1]):
            raise DitfError(f"store: {self.path}: the grid of image {self._name(row)} is damaged ({rows}x{cols}); "
                            "run `ditf doctor --repair`")
        pre_adaln = self._read_row("pre_adaln", row, (slice(0, rows), slice(0, cols)))
        wanted = None if vectors is None else set(vectors)
        names = [n for n in self.modulation_names if wanted is None or n in wanted]
        modulation = {name: self._read_row(name, row) for name in names}
        for name, vector in modulation.items():
            if np.isnan(vector).all():  # the NaN fill: this image's chunk is absent from its shard
                raise DitfError(f"store: {self.path}: the {name} vector of committed image {self._name(row)} is missing; "
                                "run `ditf doctor --repair`, then rerun `ditf extract`")
        return pre_adaln, modulation


class PromptCache:
    """Encoded prompts of one model, so text encoders run once per distinct prompt.

    One group per prompt (named by the text's digest), published whole: a kill while caching
    leaves each prompt either cached or absent. Writers hold the cache's lock.
    """

    def __init__(self, store: FeatureStore, path: str, identity: Mapping) -> None:
        self.store = store
        self.path = path
        self.identity = identity
        self.read_only = store.read_only

    def _entry(self, text: str) -> zarr.Group | None:
        group = self.store._group(f"{self.path}/{_text_digest(text)}")
        if group is None or group.attrs.get("text") != text:
            return None
        return group

    def get(self, text: str) -> dict[str, np.ndarray] | None:
        group = self._entry(text)
        if group is None:
            return None
        try:
            return {name: np.asarray(group[name][...]) for name in group.attrs["names"]}
        except Exception:
            return None  # a damaged entry is a cache miss: the prompt is encoded again

    def get_many(self, texts: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        found = {text: self.get(text) for text in texts}
        return {text: value for text, value in found.items() if value is not None}

    def texts(self) -> dict[str, int]:
        """Cached prompt texts (the value is an ordinal, kept for callers of schema 1)."""
        texts = []
        for _, group in self.store._subgroups(self.path) if self.store._group(self.path) is not None else []:
            if "text" in group.attrs:
                texts.append(str(group.attrs["text"]))
        return {text: i for i, text in enumerate(sorted(texts))}

    @_writes
    def put(self, text: str, embedding: Mapping[str, np.ndarray]) -> None:
        store = self.store
        with store.lock(self.path, f"another process is writing the prompt cache {self.path} of {store.path}",
                        wait=_PROMPT_LOCK_WAIT):
            if store._group(self.path) is None:
                with store._staged({"identity": self.identity}) as (staged, _):
                    store._publish(staged, self.path)
            node = f"{self.path}/{_text_digest(text)}"
            if store._group(node) is not None:
                store.delete(node)  # another text with the same digest prefix, or a damaged entry
            with store._staged({"text": text, "names": sorted(embedding)}) as (staged, new):
                for name, value in sorted(embedding.items()):
                    value = np.asarray(value, dtype=np.float32)
                    array = new.create_array(name, shape=value.shape, chunks=value.shape or None, dtype="float32",
                                             fill_value=0, compressors=_COMPRESSED,
                                             dimension_names=tuple(f"{name}_{i}" for i in range(value.ndim)))
                    array[...] = value
                store._publish(staged, node)


@dataclass
class PredictionArrays:
    group: zarr.Group
    path: str = ""

    @property
    def pair_ids(self) -> list[str]:
        return [str(p) for p in self.group["pair_id"][:]]

    @property
    def config(self) -> dict:
        return dict(self.group.attrs.get("config", {}))

    def done(self) -> np.ndarray:
        try:
            return np.asarray(self.group["done"][:], dtype=bool)
        except Exception as exc:
            raise DitfError(f"store: predictions {self.path}: array done is damaged ({_reason(exc)}): "
                            "run `ditf doctor --repair`") from exc

    @_writes
    def write(self, start: int, predictions: Sequence[np.ndarray]) -> None:
        """Write a block of consecutive pairs, then mark them done."""
        block = np.full((len(predictions), *self.group["pred"].shape[1:]), np.nan, dtype=np.float32)
        for i, pred in enumerate(predictions):
            block[i, : len(pred)] = pred
        self.group["pred"][start : start + len(predictions)] = block
        self.group["done"][start : start + len(predictions)] = True

    def clear_done(self, start: int, stop: int) -> None:
        """Un-commit a block of pairs (the doctor's repair of a damaged block)."""
        self.group["done"][start:stop] = False

    def damaged_blocks(self) -> list[tuple[int, int, str]]:
        """(start, stop, reason) of every block with done pairs whose `pred` chunk is missing or damaged."""
        done = self.done()
        pred = self.group["pred"]
        block = pred.chunks[0]
        bad = []
        for start in range(0, len(done), block):
            if not done[start : start + block].any():
                continue
            try:
                if not _chunk_exists(pred, start):
                    bad.append((start, min(start + block, len(done)), "chunk missing"))
                    continue
                pred[start : start + block]
            except Exception as exc:
                bad.append((start, min(start + block, len(done)), _reason(exc)))
        return bad

    def _values(self) -> np.ndarray:
        bad = self.damaged_blocks()
        if bad:
            start, stop, reason = bad[0]
            raise DitfError(f"store: predictions {self.path}: pairs {start}..{stop - 1} are damaged ({reason}): "
                            "run `ditf doctor --repair`, then rerun `ditf match`")
        return self.group["pred"][:]

    def read_values(self) -> dict[str, np.ndarray]:
        """pair_id -> stored value as written (NaN padding kept), for pairs that are done."""
        done = self.done()
        values = self._values()
        return {pair_id: values[i] for i, pair_id in enumerate(self.pair_ids) if done[i]}

    def read(self) -> dict[str, np.ndarray]:
        """pair_id -> (N, 2) predictions (NaN rows stripped), for pairs that are done."""
        done = self.done()
        pred = self._values()
        out = {}
        for i, pair_id in enumerate(self.pair_ids):
            if done[i]:
                rows = pred[i]
                out[pair_id] = rows[~np.isnan(rows[:, 0])]
        return out


# ---- the doctor's walk ----------------------------------------------------------------------------
@dataclass
class Finding:
    """One problem in a store, and what `ditf doctor --repair` does about it."""

    problem: str
    repair: str = "no automatic repair"
    action: Callable[[], None] | None = field(default=None, repr=False)
    harmless: bool = False  # reported and repaired, but nothing reads it (not counted as a problem)


def _metadata_problem(backend, rel: str) -> str | None:
    """Why a zarr.json cannot be trusted (unparsable, not a zarr v3 node), or None."""
    try:
        meta = json.loads(backend.read_text(rel))
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") not in ("group", "array"):
            return "not zarr v3 metadata"
        if meta["node_type"] == "array" and not isinstance(meta.get("data_type"), (str, dict)):
            return "no data type"
    except (OSError, UnicodeDecodeError, ValueError, DitfError) as exc:
        return _reason(exc)
    return None


def repair_root_metadata(path: str | Path) -> str | None:
    """Rewrite a store's unreadable root zarr.json (it holds only the schema version)."""
    location = store_location(path)
    backend = _backend(location)
    if not backend.exists("zarr.json") or _metadata_problem(backend, "zarr.json") is None:
        return None
    backend.write_text("zarr.json", _root_metadata().decode())
    return f"rewrote the root metadata of {location} (schema version {SCHEMA_VERSION})"


def _node_kind(parts: Sequence[str]) -> str:
    """What a node path inside the store is: root, index, key, key-part, predictions, prompt, intermediate."""
    if not parts:
        return "root"
    if parts[0] == "prompts":
        return "prompt" if len(parts) >= 2 else "intermediate"
    if len(parts) >= 2 and parts[1] == "images":
        return "index"
    if len(parts) >= 5 and parts[4] == "predictions":
        return "predictions" if len(parts) >= 8 or (len(parts) >= 7) else "intermediate"
    if len(parts) >= 4:
        return "key"
    return "intermediate"


def audit_store(store: FeatureStore, read_chunks: bool = True) -> tuple[list[str], list[Finding]]:
    """Walk a store: metadata, half-done setups, every committed image's and block's chunks.

    Returns (lines that are fine, findings). Nothing is changed: each finding carries the
    repair action, run by the caller (`ditf doctor --repair`) on a writable store.
    """
    ok: list[str] = []
    findings: list[Finding] = []
    fs = store.backend
    removed: set[str] = set()

    def remove(node: str, why: str) -> Finding:
        def act() -> None:
            if node not in removed:
                removed.add(node)
                fs.remove(node)
        return Finding(why, f"removed {node}", act)

    # 1. leftovers of interrupted setups (never visible to readers, but they take space)
    for name in fs.list(f"{_META}/staging"):
        staged = f"{_META}/staging/{name}"
        findings.append(Finding(f"store: unfinished setup left by an interrupted run: {fs.where(staged)}",
                                f"removed {fs.where(staged)}", functools.partial(fs.discard, staged)))
    for sibling, discard in fs.stray_creations():
        findings.append(Finding(f"store: unfinished store creation left by an interrupted run: {sibling}",
                                f"removed {sibling}", discard))

    for partial, discard in fs.partial_files():
        findings.append(Finding(f"store: leftover of a write interrupted by a crash: {partial}",
                                f"removed {partial}", discard, harmless=True))

    # 1b. a consolidated copy of the metadata that no longer matches the nodes (edited by hand,
    # or written by another tool while ditf wrote): readers would trust it
    stale = _stale_consolidated(fs)
    if stale:
        findings.append(Finding(f"store: the consolidated metadata in the root zarr.json is stale ({stale}); "
                                "readers would see the store as it was",
                                "dropped the consolidated metadata (the next ditf writer writes it anew)",
                                store._drop_consolidated))

    # 2. every node's metadata parses (a damaged zarr.json must not crash the walk)
    damaged_nodes: list[str] = []
    for folder in fs.metadata_nodes():
        rel = tuple(folder.split("/")) if folder else ()
        if rel[:1] == (_META,) or "c" in rel:
            continue
        meta = f"{folder}/zarr.json" if folder else "zarr.json"
        why = _metadata_problem(fs, meta)
        if why is None:
            continue
        node = "/".join(rel)
        damaged_nodes.append(node)
        kind = _node_kind(rel)
        problem = f"store: the metadata of {node or 'the root'} is damaged ({why})"
        if kind == "root":
            findings.append(Finding(problem, "rewrote the root metadata", functools.partial(repair_root_metadata, store.path)))
        elif kind == "key":
            findings.append(remove("/".join(rel[:4]), problem + "; the key's layout or configuration is lost, "
                                   "its images will be extracted again"))
        elif kind == "predictions":
            findings.append(remove("/".join(rel[:8] if len(rel) >= 8 else rel[:7]), problem + "; predictions are recomputed by `ditf match`"))
        elif kind == "prompt":
            findings.append(remove("/".join(rel[:3] if len(rel) >= 3 else rel[:2]), problem + "; prompts are encoded again"))
        elif kind == "intermediate":
            def rewrite(path=meta) -> None:
                fs.write_text(path, json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
            findings.append(Finding(problem, f"rewrote {node}/zarr.json as a plain group", rewrite))
        else:
            findings.append(Finding(problem + "; every key's rows depend on the image index"))
    if any(not node for node in damaged_nodes):
        return ok, findings  # nothing below can be opened until the root is repaired

    def under_damage(node: str) -> bool:
        return any(node == d or node.startswith(d + "/") or d.startswith(node + "/") for d in damaged_nodes)

    # 3. feature keys: complete setups, dtypes, every committed image readable
    for ds in store._dataset_names():
        if under_damage(f"{ds}/images"):
            continue
        try:
            rows = store.image_rows(ds)
            ok.append(f"store: {ds}/images: {len(rows)} images indexed")
        except DitfError as exc:
            findings.append(Finding(f"store: {ds}/images: {exc}"))
            continue
        for model in fs.list(ds):
            for k_name in fs.list(f"{ds}/{model}"):
                for t_name in fs.list(f"{ds}/{model}/{k_name}"):
                    node = f"{ds}/{model}/{k_name}/{t_name}"
                    if not (k_name[:1] == "k" and t_name[:1] == "t") or under_damage(node) or not fs.is_dir(node):
                        continue
                    if not fs.list(node):
                        continue  # an empty folder (a schema-1 lock): nothing to report
                    _audit_key(store, node, ds, findings, ok, remove, read_chunks)
    # 4. prompt caches: every entry readable
    for cache in fs.list("prompts"):
        for entry in fs.list(f"prompts/{cache}"):
            node = f"prompts/{cache}/{entry}"
            if under_damage(node) or not fs.is_dir(node):
                continue
            meta = f"{node}/zarr.json"
            if not fs.exists(meta) or json.loads(fs.read_text(meta)).get("node_type") != "group":
                continue  # a schema-1 prompt array (read by nobody now)
            group = store._group(node)
            if group is None or "text" not in group.attrs:
                continue  # a schema-1 prompt array: read by nobody, harmless
            try:
                for name in group.attrs["names"]:
                    group[name][...]
            except Exception as exc:
                findings.append(remove(node, f"store: prompt cache entry {node} is damaged ({_reason(exc)}); it is encoded again"))
    return ok, findings


def _audit_key(store, node, dataset, findings, ok, remove, read_chunks) -> None:
    fs = store.backend
    group = store._group(node) if fs.exists(f"{node}/zarr.json") else None
    if group is None or "complete" not in group or "config" not in group.attrs or "modulation" not in group.attrs:
        committed = 0
        try:
            committed = int(np.asarray(group["complete"][:]).sum()) if group is not None and "complete" in group else 0
        except Exception:
            pass
        note = "" if not committed else f" ({committed} committed images without a trustworthy configuration are extracted again)"
        findings.append(remove(node, f"store: {node}: half-done setup of a feature key{note}"))
        return
    expected = {**_FEATURE_DTYPES, **{name: _MODULATION_DTYPE for name in group.attrs["modulation"]}}
    wrong = []
    for name, dtype in expected.items():
        meta = f"{node}/{name}/zarr.json"
        stored = json.loads(fs.read_text(meta)).get("data_type") if fs.exists(meta) else None
        if stored is not None and stored != dtype:
            wrong.append(name)

            def restore(meta=meta, dtype=dtype) -> None:  # the chunks' checksums then vouch for the bytes
                fixed = {**json.loads(fs.read_text(meta)), "data_type": dtype}
                if dtype == "bool":
                    fixed["fill_value"] = bool(fixed.get("fill_value") or False)
                fs.write_text(meta, json.dumps(fixed, indent=2))

            findings.append(Finding(f"store: {node}: array {name} has dtype {stored} in its metadata, not {dtype}",
                                    f"restored the dtype of {node}/{name} to {dtype}", restore))
    if wrong:
        return
    try:
        arrays = store._feature_arrays(group, node, dataset)
        n = arrays.n_images
        short = [name for name in ["pre_adaln", "grid", *arrays.modulation_names] if group[name].shape[0] < n]
        if short:
            raise DitfError(f"arrays {', '.join(short)} have fewer rows than complete")
    except DitfError as exc:
        findings.append(remove(node, f"store: {node}: {exc}; its images are extracted again"))
        return
    complete = _readable_complete(arrays, node, findings)
    broken: set[int] = set()
    if read_chunks:
        # a damaged shard of a small array (its index or an image's chunk): the whole file goes,
        # with the commit of every image it held (a later write into it could not read it back)
        for name in ["grid", *arrays.modulation_names]:
            array = group[name]
            step = _file_rows(array)
            if step == 1:
                continue  # one chunk per image (schema 2): checked image by image below
            for start in range(0, n, step):
                stop = min(start + step, n)
                committed = [int(r) for r in complete[start:stop].nonzero()[0] + start]
                exists = _chunk_exists(array, start)
                if not committed and not exists:
                    continue
                try:
                    if not exists:
                        raise DitfError("its file is missing")
                    array[start:stop]
                except Exception as exc:
                    broken.update(committed)
                    findings.append(Finding(
                        f"store: {node}: the {name} file of images {start}..{stop - 1} is damaged ({_reason(exc)}); "
                        f"{len(committed)} committed images lose their AdaLN vectors or grid",
                        f"cleared the complete flag of those {len(committed)} images and removed that file of {node}/{name}: "
                        "the next extract redoes them",
                        functools.partial(arrays.drop_rows, committed, name, start)))
        for row in map(int, complete.nonzero()[0]):
            if row in broken:
                continue
            try:
                arrays.read_image(row)
            except DitfError as exc:
                broken.add(row)
                findings.append(Finding(f"store: {node}: committed image {arrays._name(row)} is unreadable ({exc})",
                                        f"cleared the complete flag of {arrays._name(row)} in {node}: the next extract redoes it",
                                        functools.partial(arrays.clear_complete, [row])))
    ok.append(f"store: {node}: {int(complete.sum()) - len(broken)}/{len(complete)} images complete and readable")
    base = f"{node}/predictions"
    for first in fs.list(base):
        for second in fs.list(f"{base}/{first}"):
            candidates = [f"{base}/{first}/{second}"]
            if not fs.exists(f"{candidates[0]}/done"):
                candidates = [f"{base}/{first}/{second}/{third}" for third in fs.list(f"{base}/{first}/{second}")
                              if fs.is_dir(f"{base}/{first}/{second}/{third}")]
            for path in candidates:
                if any(n in ("c", "pair_id", "pred", "done") for n in path.split("/")[-1:]):
                    continue
                _audit_predictions(store, path, findings, ok, remove)


#: what a consolidated entry must agree on with the node's own zarr.json
_CONSOLIDATED_FIELDS = ("node_type", "shape", "data_type", "chunk_grid", "codecs", "fill_value", "attributes")


def _stale_consolidated(fs) -> str | None:
    """How the root's consolidated metadata differs from the nodes' own, or None (or no copy)."""
    try:
        copy = (json.loads(fs.read_text("zarr.json")).get("consolidated_metadata") or {}).get("metadata")
    except (OSError, ValueError, AttributeError):
        return None  # no copy, or a damaged root (reported below)
    if copy is None:
        return None
    on_disk = {n for n in fs.metadata_nodes() if n and not n.startswith(_META) and "c" not in n.split("/")}
    missing, extra = sorted(on_disk - set(copy)), sorted(set(copy) - on_disk)
    if missing or extra:
        return f"{len(missing)} node(s) missing from it, e.g. {missing[0]}" if missing else \
            f"{len(extra)} node(s) no longer in the store, e.g. {extra[0]}"
    for node, entry in copy.items():
        try:
            own = json.loads(fs.read_text(f"{node}/zarr.json"))
        except (OSError, ValueError):
            continue  # a damaged node: reported on its own below
        differs = [key for key in _CONSOLIDATED_FIELDS if key in own and own.get(key) != entry.get(key)]
        if differs:
            return f"{node}: {', '.join(differs)} differ"
    return None


def _readable_complete(arrays: "FeatureArrays", node: str, findings: list[Finding]) -> np.ndarray:
    """The commit flags, file by file: a damaged file of `complete` costs the images it holds
    (the repair removes it, so they count as not extracted), never the whole key."""
    array = arrays.group["complete"]
    step, n = _file_rows(array), array.shape[0]
    flags = np.zeros(n, dtype=bool)
    for start in range(0, n, step):
        stop = min(start + step, n)
        try:
            flags[start:stop] = np.asarray(array[start:stop], dtype=bool)
        except Exception as exc:
            findings.append(Finding(
                f"store: {node}: the complete flags of images {start}..{stop - 1} are damaged ({_reason(exc)})",
                f"removed that file of {node}/complete: the next extract redoes those images",
                functools.partial(arrays.drop_rows, [], "complete", start)))
    return flags


def _audit_predictions(store, path, findings, ok, remove) -> None:
    group = store._group(path) if store.backend.exists(f"{path}/zarr.json") else None
    if group is None or not all(name in group for name in ("pair_id", "pred", "done")):
        findings.append(remove(path, f"store: {path}: half-done predictions setup; `ditf match` recomputes it"))
        return
    predictions = PredictionArrays(group, path)
    try:
        done = predictions.done()
        bad = predictions.damaged_blocks()
        if str(group["pred"].dtype) != "float32" or str(group["done"].dtype) != "bool":
            raise DitfError("wrong dtype in the metadata")
    except DitfError as exc:
        findings.append(remove(path, f"store: {path}: {exc}; `ditf match` recomputes it"))
        return
    for start, stop, reason in bad:
        findings.append(Finding(f"store: {path}: pairs {start}..{stop - 1} are damaged ({reason})",
                                f"cleared done for pairs {start}..{stop - 1} of {path}: the next match redoes them",
                                functools.partial(predictions.clear_done, start, stop)))
    ok.append(f"store: {path}: {int(done.sum())}/{len(done)} pairs done")
