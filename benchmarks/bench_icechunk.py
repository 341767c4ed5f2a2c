"""Icechunk against ditf's own transaction layer, side by side in one run.

The question (stores/README.md, "Why not Icechunk"): should Icechunk, a transactional storage
engine for Zarr, carry the store's transactions (staging + rename, commit marks, locks, leases,
half-setup repair) instead of ditf's own code? This script builds a prototype backend on an
Icechunk repository behind ditf's `Backend` interface (`IcechunkBackend`, below; it lives here
only: it is not a user option) and runs the same `FeatureStore` calls over it and over ditf's
local and object-store backends:

* **cost**: commit cost per image (wall time of `write_image` plus, for Icechunk, the commit
  that publishes it) and files / objects per image, on a local disk and on an S3 server;
* **kills**: SIGKILL before every single store write (ditf's own kill hook, `store.faults`,
  counts the writes of both: zarr writes through its `WrapperStore`, and each Icechunk commit),
  then a plain rerun: does it end equal to an uninterrupted run, and what is left behind;
* **concurrent**: two writers of disjoint images of one key (as `--shard 1/2`, `--shard 2/2`);
* **damage**: one flipped byte in an image's chunk, in Icechunk's manifest, in its snapshot;
* **readers**: what it takes to read the store: plain `zarr.open_group`, xarray, a plain HTTP
  server.

The S3 server is moto's (as in tests/test_object_store.py), on 127.0.0.1.

Icechunk 2.x needs Python >= 3.12 (ditf supports 3.11), so this runs in a venv of its own::

    python3.12 -m venv /tmp/icevenv
    /tmp/icevenv/bin/pip install icechunk==2.3.0 zarr==3.1.6 numcodecs==0.16.6 numpy s3fs 'moto[server]' \\
        xarray aiohttp requests
    /tmp/icevenv/bin/pip install --no-deps -e .
    /tmp/icevenv/bin/python benchmarks/bench_icechunk.py --kill-every 1 --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.server
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import StorePath, WrapperStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ICECHUNK_LOG", "error")  # its warnings about local storage are reported below, once

from ditf_pipeline.store import faults  # noqa: E402
from ditf_pipeline.store import feature_store as feature_store_module  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402

BUCKET = "bench"
DATASET, MODEL, K, T = "bench", "m", 1, 2
CONFIG = {"model": MODEL, "synthetic": True}


# ---- the prototype: an Icechunk repository behind ditf's Backend interface -------------------------
class _SessionStore(WrapperStore):
    """The backend's current writable session's store: a commit ends a session, the next takes over."""

    def __init__(self, backend: IcechunkBackend) -> None:  # no super().__init__: `_store` is the live session's
        self._backend = backend

    @property
    def _store(self):  # type: ignore[override]
        return self._backend.session.store

    def _with_store(self, store):
        return self


class IcechunkBackend:
    """ditf's `Backend` over one branch of an Icechunk repository (a prototype, benchmark only).

    Setups are still built under a staging prefix and published by copying into place, as on
    object storage, but the publish is one Icechunk commit (atomic: the node appears whole or
    not at all); `commit` publishes whatever else was written since (an image, index rows).
    Locks are no-ops: Icechunk has none; concurrent commits are rebased (`BasicConflictSolver`).
    """

    remote = True

    def __init__(self, storage, name: str) -> None:
        import icechunk

        self.icechunk = icechunk
        self.name = name
        self.repo = icechunk.Repository.open_or_create(storage)
        self.session = self.repo.writable_session("main")
        self.store = faults.wrap(_SessionStore(self))
        self.conflicts = 0

    def __str__(self) -> str:
        return f"icechunk://{self.name}"

    def commit(self, message: str) -> None:
        faults.before_write(f"commit {message}")
        if not self.session.has_uncommitted_changes:
            return
        while True:
            try:
                self.session.commit(message, rebase_with=self.icechunk.BasicConflictSolver())
                break
            except self.icechunk.ConflictError:
                self.conflicts += 1
                self.session.rebase(self.icechunk.BasicConflictSolver())
        self.session = self.repo.writable_session("main")

    def _keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` (Icechunk lists only prefixes that are nodes: every key, filtered here)."""
        async def collect() -> list[str]:
            return [key async for key in self.store.list()]
        return [key for key in sync(collect()) if key.startswith(prefix)]

    def where(self, rel: str) -> str:
        return f"{self}/{rel}" if rel else str(self)

    def exists(self, rel: str) -> bool:
        if rel and sync(self.store.exists(rel)):
            return True
        return bool(self._keys(f"{rel}/" if rel else ""))

    def is_dir(self, rel: str) -> bool:
        return bool(self._keys(f"{rel}/" if rel else ""))

    def list(self, rel: str) -> list[str]:
        prefix = f"{rel}/" if rel else ""
        return sorted({key[len(prefix):].split("/")[0] for key in self._keys(prefix)})

    def read_text(self, rel: str) -> str:
        return sync(self.store.get(rel, default_buffer_prototype())).to_bytes().decode()

    def write_text(self, rel: str, text: str) -> None:
        sync(self.store.set(rel, default_buffer_prototype().buffer.from_bytes(text.encode())))

    def zarr_store(self, rel: str = "", read_only: bool = False):
        return StorePath(self.store, rel)

    def root_problem(self, read_only: bool) -> str | None:
        return None

    def metadata_nodes(self) -> list[str]:
        return sorted(k[: -len("/zarr.json")] if k != "zarr.json" else "" for k in self._keys("") if k.endswith("zarr.json"))

    def create_root(self, metadata: bytes) -> None:
        sync(self.store.set("zarr.json", default_buffer_prototype().buffer.from_bytes(metadata)))
        self.commit("create the store")

    def new_staging(self) -> str:
        return f"ditf_staging/{uuid.uuid4().hex}"  # zarr node names cannot start with "."

    def discard(self, rel: str) -> None:
        sync(self.store.delete_dir(rel))

    def publish(self, staged: str, node: str) -> bool:
        if self.exists(f"{node}/zarr.json"):
            return False
        for key in self._keys(f"{staged}/"):
            value = sync(self.store.get(key, default_buffer_prototype()))
            sync(self.store.set(f"{node}/{key[len(staged) + 1:]}", value))
        sync(self.store.delete_dir(staged))
        self.commit(f"publish {node}")
        return True

    def remove(self, rel: str) -> None:
        sync(self.store.delete_dir(rel))
        self.commit(f"remove {rel}")

    def lock(self, rel: str, refusal: str, wait: float):
        return contextlib.nullcontext()

    def stray_creations(self) -> list:
        return []

    def partial_files(self) -> list:
        return []


@contextlib.contextmanager
def _icechunk_feature_store(backend: IcechunkBackend) -> Iterator[FeatureStore]:
    """A `FeatureStore` opened on `backend` (the facade picks its backend from the path: patched here)."""
    saved = feature_store_module.store_location, feature_store_module.backend_for
    feature_store_module.store_location = str
    feature_store_module.backend_for = lambda location, on_write=None: backend
    try:
        yield FeatureStore(str(backend))
    finally:
        feature_store_module.store_location, feature_store_module.backend_for = saved


def _icechunk_storage(where: str):
    import icechunk

    if where.startswith("s3://"):
        bucket, _, prefix = where[5:].partition("/")
        return icechunk.s3_storage(bucket=bucket, prefix=prefix, endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                                   allow_http=True, force_path_style=True, region="us-east-1",
                                   access_key_id="testing", secret_access_key="testing")
    return icechunk.local_filesystem_storage(where)


@contextlib.contextmanager
def open_store(kind: str, where: str) -> Iterator[tuple[FeatureStore, Callable[[str], None]]]:
    """(store, commit) of one backend: `commit` publishes a finished image (a no-op for ditf's own)."""
    if kind == "icechunk":
        backend = IcechunkBackend(_icechunk_storage(where), where)
        with _icechunk_feature_store(backend) as store:
            yield store, backend.commit
    else:
        with FeatureStore(where) as store:
            yield store, lambda message: None


# ---- the workload: one key, images written one by one ----------------------------------------------
def image_data(row: int, grid: tuple[int, int], hidden: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(row)
    pre = rng.normal(0, 1, size=(*grid, hidden)).astype(np.float16)
    return pre, {name: rng.normal(0, 0.1, hidden).astype(np.float32) for name in ("shift", "scale", "gate")}


def write_key(kind: str, where: str, *, n: int, grid: tuple[int, int], hidden: int, rows: range | None = None,
              shard: str | None = None) -> dict[str, float]:
    """Register `n` images, set the key up, write `rows` of them (all by default) one by one."""
    keys = [f"img{i:05d}" for i in range(n)]
    timings: dict[str, float] = {}
    with open_store(kind, where) as (store, commit):
        started = time.perf_counter()
        lock = store.writer_lock(DATASET, MODEL, K, T, shard=shard) if kind != "icechunk" else contextlib.nullcontext()
        with lock:
            index = store.register_images(DATASET, keys, [(64, 64)] * n)
            commit("register images")
            arrays = store.open_features(DATASET, MODEL, K, T, config=CONFIG, n_images=n, grid_max=grid, hidden_size=hidden)
            timings["setup_s"] = time.perf_counter() - started
            complete = arrays.complete()
            started = time.perf_counter()
            written = 0
            for key in (keys if rows is None else [keys[r] for r in rows]):
                row = index[key]
                if complete[row]:
                    continue
                pre, modulation = image_data(row, grid, hidden)
                arrays.write_image(row, pre, modulation)
                commit(f"image {key}")
                written += 1
            timings["images_s"] = time.perf_counter() - started
            timings["written"] = written
    return timings


def _child(argv: list[str]) -> None:
    """`python bench_icechunk.py _child KIND WHERE N GRID HIDDEN [FIRST LAST SHARD]` (a subprocess)."""
    kind, where, n, grid, hidden = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    rows = range(int(argv[5]), int(argv[6])) if len(argv) > 6 else None
    out = write_key(kind, where, n=n, grid=(grid, grid), hidden=hidden, rows=rows, shard=argv[7] if len(argv) > 7 else None)
    print(json.dumps(out), flush=True)


def _run_child(kind: str, where: str, n: int, grid: int, hidden: int, *extra: str, env: dict | None = None,
               wait: bool = True):
    cmd = [sys.executable, __file__, "_child", kind, where, str(n), str(grid), str(hidden), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


# ---- what is stored -------------------------------------------------------------------------------
def read_root(kind: str, where: str) -> zarr.Group:
    if kind == "icechunk":
        import icechunk

        repo = icechunk.Repository.open(_icechunk_storage(where))
        return zarr.open_group(repo.readonly_session("main").store, mode="r")
    options = {"storage_options": {"use_listings_cache": False}} if where.startswith("s3://") else {}
    return zarr.open_group(where, mode="r", use_consolidated=False, **options)


def snapshot(kind: str, where: str) -> dict[str, Any]:
    """Every node's attributes and every array's values (the staging prefix left out)."""
    out: dict[str, Any] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        attrs = dict(group.attrs)
        attrs.pop("provenance", None)
        out[f"{prefix}/@"] = json.dumps(attrs, sort_keys=True, default=str)
        for name, node in sorted(group.members(), key=lambda m: m[0]):
            if name == "ditf_staging":
                continue
            if isinstance(node, zarr.Array):
                out[f"{prefix}/{name}"] = (node.shape, str(node.dtype), np.asarray(node[...]))
            else:
                walk(node, f"{prefix}/{name}")

    walk(read_root(kind, where), "")
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, str):
            if value != other:
                return False
        elif value[:2] != other[:2] or not np.array_equal(value[2], other[2], equal_nan=value[2].dtype.kind == "f"):
            return False
    return True


def files(where: str) -> tuple[int, int]:
    """(files or objects, bytes) under a local folder or an s3:// prefix."""
    if where.startswith("s3://"):
        import s3fs

        found = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False).find(where[5:], detail=True)
        return len(found), sum(int(info.get("size", 0)) for info in found.values())
    paths = [p for p in Path(where).rglob("*") if p.is_file()]
    return len(paths), sum(p.stat().st_size for p in paths)


# ---- scenarios --------------------------------------------------------------------------------------
def bench_cost(tmp: Path, s3: str, n: int, grid: int, hidden: int) -> dict:
    """Per image: wall time of writing and committing it; files / objects and bytes per image."""
    results = {}
    for kind, where in (("ditf", str(tmp / "cost-ditf.zarr")), ("icechunk", str(tmp / "cost-icechunk")),
                        ("ditf", f"{s3}/cost-ditf.zarr"), ("icechunk", f"{s3}/cost-icechunk")):
        label = f"{kind}-{'s3' if where.startswith('s3://') else 'local'}"
        code, out, err = _run_child(kind, where, n, grid, hidden)
        if code != 0:
            results[label] = {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {code}"}
            continue
        timing = json.loads(out.strip().splitlines()[-1])
        count, size = files(where)
        # a second run of the same size into the same key adds nothing: count again after n more images
        results[label] = {
            "images": n, "setup_s": round(timing["setup_s"], 4),
            "per_image_ms": round(1000 * timing["images_s"] / n, 2),
            "files": count, "bytes": size, "files_per_image": round(count / n, 3), "bytes_per_image": round(size / n),
        }
        print(label, results[label], flush=True)
    return results


def _write_points(kind: str, where: str, n: int, grid: int, hidden: int, tmp: Path) -> int:
    count = tmp / f"count-{kind}"
    code, _, err = _run_child(kind, where, n, grid, hidden, env={"DITF_WRITE_COUNT_FILE": str(count)})
    assert code == 0, err
    return int(count.read_text())


def bench_kills(tmp: Path, n: int, grid: int, hidden: int, every: int) -> dict:
    """SIGKILL before write i (every write up to `every`, then every `every`-th), rerun, compare."""
    results = {}
    for kind in ("ditf", "icechunk"):
        reference = str(tmp / f"kill-ref-{kind}")
        total = _write_points(kind, reference, n, grid, hidden, tmp)
        want = snapshot(kind, reference)
        ref_files = files(reference)[0]
        points = sorted({*range(1, min(total, every) + 1), *range(every, total + 1, every), total})
        failures, extra_files, killed = [], [], 0
        for i in points:
            where = str(tmp / f"kill-{kind}-{i}")
            marker = tmp / "killed"
            marker.unlink(missing_ok=True)
            code, _, err = _run_child(kind, where, n, grid, hidden,
                                      env={"DITF_KILL_AT_WRITE": str(i), "DITF_KILL_MARKER": str(marker)})
            killed += code == -signal.SIGKILL
            code, _, err = _run_child(kind, where, n, grid, hidden)
            if code != 0:
                failures.append(f"kill at {i}: rerun exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
            elif not same(snapshot(kind, where), want):
                failures.append(f"kill at {i}: store differs from an uninterrupted run's")
            extra_files.append(files(where)[0] - ref_files)
            shutil.rmtree(where, ignore_errors=True)
        results[kind] = {"write_points": total, "kill_points_tried": len(points), "killed": killed,
                         "failures": failures, "extra_files_after_rerun": {"max": max(extra_files),
                                                                           "runs_with_extra": sum(e > 0 for e in extra_files)}}
        print(kind, "kills", results[kind], flush=True)
    return results


def bench_concurrent(tmp: Path, s3: str, grid: int, hidden: int) -> dict:
    """Two writers of one key at once, each with its own block of rows (as two `--shard` jobs).

    "each sets up": both register the images and create the key, as two `ditf extract --shard`
    jobs started together do; "set up first": one run sets up, then the two write images only.
    """
    results = {}
    rows_per_shard, n = 8, 16
    env = {"DITF_ROWS_PER_SHARD": str(rows_per_shard)}
    for kind, where in (("ditf", str(tmp / "conc-ditf.zarr")), ("icechunk", str(tmp / "conc-icechunk")),
                        ("icechunk", f"{s3}/conc-icechunk")):
        for setup_first in (False, True):
            place = f"{where}-{'first' if setup_first else 'each'}"
            label = f"{kind}-{'s3' if where.startswith('s3://') else 'local'}, {'set up first' if setup_first else 'each sets up'}"
            if setup_first:
                _run_child(kind, place, n, grid, hidden, "0", "0", env=env)
            started = time.perf_counter()
            procs = [_run_child(kind, place, n, grid, hidden, str(a), str(b), f"{i + 1}/2", env=env, wait=False)
                     for i, (a, b) in enumerate(((0, rows_per_shard), (rows_per_shard, n)))]
            outcomes = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
            entry: dict[str, Any] = {"exit_codes": [code for code, _ in outcomes],
                                     "wall_s": round(time.perf_counter() - started, 2),
                                     "errors": [err.strip().splitlines()[-1] for code, err in outcomes if code and err.strip()]}
            try:
                root = read_root(kind, place)
                got = root[f"{DATASET}/{MODEL}/k{K}/t{T}/pre_adaln"]
                entry["images_committed"] = int(np.asarray(root[f"{DATASET}/{MODEL}/k{K}/t{T}/complete"][:]).sum())
                entry["of"] = n
                entry["index_rows"] = int(root[f"{DATASET}/images/key"].shape[0])
                entry["values_equal"] = all(np.array_equal(got[row], image_data(row, (grid, grid), hidden)[0])
                                            for row in range(entry["index_rows"]))
            except Exception as exc:  # a store the two writers left unreadable
                entry["read_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            results[label] = entry
            print(label, "concurrent", entry, flush=True)
    return results


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _read_all(kind: str, where: str) -> str:
    """What a reader of the damaged store gets: the first error, and how many arrays still read."""
    try:
        root = read_root(kind, where)
    except Exception as exc:
        return f"the store does not open: {_first_line(exc)}"
    arrays = [f"{DATASET}/images/key", f"{DATASET}/images/size"] + [
        f"{DATASET}/{MODEL}/k{K}/t{T}/{name}" for name in ("pre_adaln", "grid", "shift", "scale", "gate", "complete")]
    errors = []
    for name in arrays:
        try:
            root[name][...]
        except Exception as exc:
            errors.append(f"{name}: {_first_line(exc)}")
    return f"{len(arrays) - len(errors)} of {len(arrays)} arrays read" + (f"; first error {errors[0]}" if errors else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


def _icechunk_chunk_file(repo: Path) -> Path:
    """The object holding image 1's `pre_adaln` chunk in the current snapshot (found by its bytes)."""
    import icechunk

    store = icechunk.Repository.open(icechunk.local_filesystem_storage(str(repo))).readonly_session("main").store
    wanted = sync(store.get(f"{DATASET}/{MODEL}/k{K}/t{T}/pre_adaln/c/1/0/0/0", default_buffer_prototype())).to_bytes()
    return next(f for f in (repo / "chunks").iterdir() if f.read_bytes() == wanted)


def bench_damage(tmp: Path, grid: int, hidden: int) -> dict:
    """One flipped byte: in an image's chunk (both), in Icechunk's manifest and snapshot."""
    results = {}
    for kind in ("ditf", "icechunk"):
        clean = tmp / f"damage-{kind}"
        _run_child(kind, str(clean), 4, grid, hidden)
        targets = {"ditf": {"image chunk": lambda p: p / f"{DATASET}/{MODEL}/k{K}/t{T}/pre_adaln/c/1/0/0/0",
                            "array metadata (zarr.json)": lambda p: p / f"{DATASET}/{MODEL}/k{K}/t{T}/pre_adaln/zarr.json"},
                   "icechunk": {"image chunk": _icechunk_chunk_file,
                                "newest manifest": lambda p: max((p / "manifests").iterdir(), key=lambda f: f.stat().st_mtime),
                                "newest snapshot": lambda p: max((p / "snapshots").iterdir(), key=lambda f: f.stat().st_mtime)}}
        for i, (what, target) in enumerate(targets[kind].items()):
            where = tmp / f"damage-{kind}-{i}"
            shutil.copytree(clean, where)
            _flip(target(where))
            results[f"{kind}: {what}"] = _read_all(kind, str(where))
            print(kind, what, results[f"{kind}: {what}"], flush=True)
    return results


class _StaticFiles(http.server.SimpleHTTPRequestHandler):
    """A plain static file server (Python's, which answers no Range request), quiet."""

    def log_message(self, *args: Any) -> None:
        pass


class _StaticFilesWithRanges(_StaticFiles):
    """The same with single byte ranges (`Range: bytes=a-b`), as nginx or Apache serve them."""

    def send_head(self):
        wanted = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, _, last = wanted[6:].partition("-")
        start = int(first) if first else max(0, len(data) - int(last))
        stop = min(len(data), int(last) + 1) if first and last else len(data)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        import io

        return io.BytesIO(data[start:stop])


@contextlib.contextmanager
def _http_server(folder: Path, handler_class: type = _StaticFiles) -> Iterator[str]:
    handler = functools.partial(handler_class, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _attempt(fn: Callable[[], Any]) -> str:
    try:
        value = fn()
        return f"yes ({value})" if value is not None else "yes"
    except Exception as exc:
        return f"no: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"


def bench_readers(tmp: Path, grid: int, hidden: int) -> dict:
    """What a reader needs: plain zarr, xarray, and a plain HTTP server in front of the folder."""
    import xarray as xr

    ditf, ice = tmp / "read-ditf.zarr", tmp / "read-icechunk"
    _run_child("ditf", str(ditf), 4, grid, hidden)  # closed: the last writer consolidated the metadata
    _run_child("icechunk", str(ice), 4, grid, hidden)
    node = f"{DATASET}/{MODEL}/k{K}/t{T}"

    def icechunk_session(storage):
        import icechunk

        return icechunk.Repository.open(storage).readonly_session("main")

    out = {
        "ditf: plain zarr.open_group(folder)": _attempt(lambda: zarr.open_group(str(ditf), mode="r")[f"{node}/pre_adaln"].shape),
        "icechunk: plain zarr.open_group(folder)": _attempt(lambda: zarr.open_group(str(ice), mode="r")[f"{node}/pre_adaln"].shape),
        "ditf: xarray.open_datatree(folder, engine='zarr')": _attempt(
            lambda: dict(xr.open_datatree(str(ditf), engine="zarr")[node].dataset.sizes)),
        "icechunk: xarray.open_zarr(session.store) with icechunk installed": _attempt(
            lambda: dict(xr.open_zarr(icechunk_session(_icechunk_storage(str(ice))).store, group=node,
                                      consolidated=False).sizes)),
    }
    with _http_server(tmp) as url:
        out["ditf: plain zarr over a plain HTTP server"] = _attempt(
            lambda: zarr.open_group(f"{url}/read-ditf.zarr", mode="r")[f"{node}/pre_adaln"][1].shape)
        out["icechunk: plain zarr over a plain HTTP server"] = _attempt(
            lambda: zarr.open_group(f"{url}/read-icechunk", mode="r")[f"{node}/pre_adaln"][1].shape)

        def icechunk_http(url: str):
            import icechunk

            session = icechunk_session(icechunk.http_storage(f"{url}/read-icechunk"))
            return zarr.open_group(session.store, mode="r")[f"{node}/pre_adaln"][1].shape

        out["icechunk: icechunk.http_storage over a plain HTTP server (no Range support)"] = _attempt(
            lambda: icechunk_http(url))
    with _http_server(tmp, _StaticFilesWithRanges) as url:
        out["icechunk: icechunk.http_storage over an HTTP server with Range support"] = _attempt(
            lambda: icechunk_http(url))
    for key, value in out.items():
        print(key, "->", value, flush=True)
    return out


@contextlib.contextmanager
def _moto() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images of the cost run")
    parser.add_argument("--grid", type=int, default=16, help="token grid side of the cost run")
    parser.add_argument("--hidden", type=int, default=768, help="channels of the cost run")
    parser.add_argument("--kill-images", type=int, default=3, help="images of each kill run (tiny: every write is a run)")
    parser.add_argument("--kill-every", type=int, default=40, help="kill before every write up to this one, then every n-th")
    parser.add_argument("--only", default="cost,kills,concurrent,damage,readers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import icechunk

    only = set(args.only.split(","))
    result: dict[str, Any] = {
        "benchmark": "bench_icechunk", "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
        "versions": {"icechunk": icechunk.__version__, "zarr": zarr.__version__},
        "command": " ".join(sys.argv),
    }
    with tempfile.TemporaryDirectory() as folder, _moto() as s3:
        tmp = Path(folder)
        if "cost" in only:
            result["cost"] = bench_cost(tmp, s3, args.images, args.grid, args.hidden)
        if "kills" in only:
            result["kills"] = bench_kills(tmp, args.kill_images, 2, 8, args.kill_every)
        if "concurrent" in only:
            result["concurrent"] = bench_concurrent(tmp, s3, 4, 16)
        if "damage" in only:
            result["damage"] = bench_damage(tmp, 4, 16)
        if "readers" in only:
            result["readers"] = bench_readers(tmp, 4, 16)
    result["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
