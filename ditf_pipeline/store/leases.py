"""Leases: the exclusion between writers of an object store (which has no locks).

A lease is one object, created by a conditional put (only if absent), holding its owner (host,
pid, a random id) and an expiry that a heartbeat thread pushes forward while the holder runs.
Another writer is refused while the lease is live; it may take over a lease that expired (its
holder died or hung) or whose holder is a dead process on this host.

On S3 every write of a lease is compare-and-swap, checked by the server in the write's own
request: creation is `If-None-Match: *`, taking over a stale lease is `If-Match` the ETag of
the stale lease as read, and a renewal is `If-Match` the ETag of the holder's own last write.
Of two writers that found the same stale lease exactly one takes it over, and a holder whose
lease was taken over learns it at its next renewal. Other object stores (GCS, Azure through
fsspec) pass no such conditions: taking over there is read, compare, delete, conditional
create, and a renewal reads the owner back first (stores/README.md names the race that remains).

Lease reads and writes are not announced as store writes (`faults`): the heartbeat's timing
would make the write counts of the crash tests depend on the clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ..core.errors import DitfError
from . import locks

__all__ = ["LEASE_SECONDS", "ObjectLease", "check_held", "holder_gone", "is_live", "passes_conditions",
           "precondition_failed"]

#: the leases this process holds now (`check_held` runs before every object-store write)
_active: set[ObjectLease] = set()
#: a holder stops writing once this share of its lease has passed without a renewal
_SAFE_SHARE = 0.8


def check_held(what: str = "") -> None:
    """Before a write: refuse it when a lease of this process was taken over or ran out.

    A writer that was stalled (a suspended process, a frozen VM) past its lease may have been
    taken over; it learns it here, from its own clock, before it writes anything more.
    """
    with locks.GUARD:
        held = list(_active)
    for lease in held:
        why = lease.why_lost()
        if why:
            raise DitfError(f"lost the lease {lease.key} ({why}): stopped before writing more; another writer may "
                            "hold it now: rerun (completed work is kept) once it is done")


def precondition_failed(exc: BaseException) -> bool:
    """Whether `exc` is the server refusing a conditional write (HTTP 412, or 409 for a
    conditional write racing another one), as s3fs raises it."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of a failed If-None-Match
        return True
    cause = exc.__cause__ or exc.__context__
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or "pre-condition" in str(exc)


def passes_conditions(fs: Any) -> bool:
    """Whether fsspec's `fs` hands If-Match / If-None-Match to the server (S3 through s3fs): its
    writes can be compare-and-swap. GCS and Azure through fsspec pass no such conditions."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


#: how long an object-store writer's lease lasts without a heartbeat (seconds)
LEASE_SECONDS = float(os.environ.get("DITF_LEASE_SECONDS") or 60)

#: runs one fsspec call, turning its failures into one error line (`ObjectBackend.call`)
Call = Callable[..., Any]


def holder_gone(host: object, pid: object) -> bool:
    """Whether `pid` of `host` is known dead: only a process of this host can be checked."""
    if host != os.uname().nodename or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def is_live(raw: bytes) -> bool:
    """Whether the lease object `raw` still holds: not expired, its holder not a dead process of
    this host (a damaged lease counts as expired, as when it is taken over)."""
    try:
        lease = json.loads(raw)
    except ValueError:
        return False
    return isinstance(lease, dict) and not ObjectLease._stale(lease)


class ObjectLease:
    """The right to write one node of an object store, held as a lease object at `key`."""

    def __init__(self, *, fs: Any, key: str, name: str, call: Call, refusal: str, wait: float) -> None:
        """`fs`: the fsspec file system; `key`: the lease object's path in it; `name`: how this
        process records that it holds the lease (`locks.claim`)."""
        self.fs, self.key, self.name, self.call = fs, key, name, call
        self.refusal, self.wait = refusal, wait
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.ttl = LEASE_SECONDS
        self.lost = False  # the heartbeat found another owner in the lease
        self.renewed = time.monotonic()  # when the lease was last created or renewed by us
        #: S3 (s3fs) passes If-Match / If-None-Match to the server: every lease write is a compare-and-swap
        self.conditional = passes_conditions(fs)
        self.etag: str | None = None  # the ETag of our last write of the lease (S3)

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": os.uname().nodename, "pid": os.getpid(),
                           "expires": time.time() + self.ttl}).encode()

    def _read(self) -> tuple[bytes, dict] | None:
        try:
            raw = self.call("read", self.fs.cat_file, self.key)
        except FileNotFoundError:
            return None
        try:
            return raw, json.loads(raw)
        except ValueError:
            return raw, {}  # a damaged lease counts as expired

    @staticmethod
    def _stale(lease: dict) -> bool:
        # a dead process of this host: no need to wait for the expiry
        return float(lease.get("expires", 0)) < time.time() or holder_gone(lease.get("host"), lease.get("pid"))

    def _put(self, what: str, **condition: Any) -> bool:
        """Write our lease under `condition`; False when the server refuses it (the lease is not,
        or no longer, the version the condition names). Failures of another kind: one error line."""
        try:
            written = self.call(what, self.fs.pipe_file, self.key, self._body(), **condition)
        except FileExistsError:  # s3fs's translation of a failed If-None-Match
            return False
        except DitfError as exc:
            if exc.__cause__ is not None and precondition_failed(exc.__cause__):
                return False
            raise
        self.etag = written.get("ETag") if isinstance(written, dict) else None
        return True

    def _create(self) -> bool:
        return self._put("take a lease", mode="create")  # If-None-Match: * (fsspec's exclusive create)

    def _read_versioned(self) -> tuple[str, dict] | None:
        """The lease's ETag and content, the ETag read first: content read after it is that version
        or a later one (a renewal, a takeover), which is live, so a stale content is never paired
        with the ETag of a live lease."""
        try:
            etag = str(self.call("read", self.fs.info, self.key)["ETag"])
        except FileNotFoundError:
            return None
        found = self._read()
        return None if found is None else (etag, found[1])

    def _take_over(self) -> bool:
        """S3: replace the stale lease by ours only if it is still the version read (If-Match):
        of writers that all found it stale, the server lets exactly one replace it."""
        found = self._read_versioned()
        if found is None:
            return self._create()  # released meanwhile
        etag, lease = found
        if not self._stale(lease):
            return False
        return self._put("take over a stale lease", IfMatch=etag)

    def _try(self) -> bool:
        if self._create():
            return True
        if self.conditional:
            return self._take_over()
        found = self._read()
        if found is None or not self._stale(found[1]):
            return False
        again = self._read()  # the same stale lease still there: remove it, then race for a new one
        if again is None or again[0] != found[0]:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.call("remove a stale lease", self.fs.rm_file, self.key)
        return self._create()

    def why_lost(self) -> str | None:
        """Why this lease can no longer be trusted, or None while it holds."""
        if self.lost:
            return "another writer took it over"
        late = time.monotonic() - self.renewed
        if late > _SAFE_SHARE * self.ttl:
            return f"not renewed for {late:.0f} s of its {self.ttl:.0f} s"
        return None

    def _renew(self) -> bool:
        """Push the expiry forward; False (and `lost` set: the next write stops, `check_held`) when
        another writer took the lease over. On S3 the renewal is If-Match our last write, so a
        takeover between a read and the renewal cannot be overwritten; elsewhere the owner is read
        back first. Network failures raise (the heartbeat tries again). A renewal that reached the
        server but whose answer was lost leaves us a stale ETag: the next one is refused and the
        writer stops, the safe side of not knowing."""
        if self.conditional:
            if self.etag is None or not self._put("renew a lease", IfMatch=self.etag):
                self.lost = True
                return False
        else:
            found = self._read()
            if found is None or found[1].get("owner") != self.owner:
                self.lost = True
                return False
            self.fs.pipe_file(self.key, self._body())
        self.renewed = time.monotonic()
        return True

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                if not self._renew():
                    return
            except Exception:  # a transient network error: the next beat tries again (`why_lost` times it)
                continue

    def _release(self) -> None:
        """Remove our lease, and only ours (S3: If-Match our last write; elsewhere the owner read back)."""
        if self.lost:
            return
        if self.conditional and self.etag is not None:
            bucket, name, _ = self.fs.split_path(self.key)
            with contextlib.suppress(Exception):  # taken over meanwhile (refused), or gone: not ours to remove
                self.fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=self.etag)
            return
        found = self._read()
        if found is not None and found[1].get("owner") == self.owner:
            with contextlib.suppress(Exception):
                self.fs.rm_file(self.key)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lease for the `with` block (waiting up to `wait` seconds for it)."""
        deadline = time.monotonic() + self.wait
        while True:
            with locks.GUARD:
                mine = locks.claim(self.name)
                if mine and not self._try():
                    locks.release(self.name)
                    mine = False
            if mine:
                self.renewed = time.monotonic()
                break
            if time.monotonic() >= deadline:
                raise DitfError(self.refusal)
            time.sleep(min(1.0, max(self.wait / 20, 0.1)))
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True, name=f"ditf-lease {self.key}")
        beat.start()
        with locks.GUARD:
            _active.add(self)
        try:
            yield
        finally:
            with locks.GUARD:
                _active.discard(self)
            stop.set()
            beat.join()
            locks.release(self.name)
            self._release()
