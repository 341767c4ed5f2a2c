"""Extraction and matching over dask.distributed workers (many GPUs, or many machines).

The coordinator does every metadata write before anything is dispatched: it registers the
images, creates (or validates) the feature arrays, encodes and caches the prompts, and creates
the prediction arrays. Workers then only write whole chunks of arrays that already exist, each
task its own images (one chunk per image) or its own block of 256 pairs (one chunk of `pred`
and `done`), which Zarr's local store makes safe across processes (each chunk is written
atomically). A worker lost mid-run costs only its task in flight: dask reschedules the task
on another worker, and since every image (block) is committed by its `complete` (`done`)
flag after its chunks, the redone task skips what was already committed and rewrites the rest
with identical bytes.

    with dask_client(workers=2) as client:           # LocalCluster, one process per GPU
        extract_distributed(client, AdapterArgs("flux", dtype="bf16"), "stores/ditf.zarr", settings, dataset)
        predict_distributed(client, FeatureStore("stores/ditf.zarr"), dataset, "flux", 28, 260, MatchSettings())

Each worker process loads the model once (`_ADAPTERS`, keyed by the adapter arguments) and
keeps it for the tasks of one run; scheduling is dask's own (`client.map` + `as_completed`).
Workers need the package installed and the dataset and store at the same paths (a shared
filesystem when the scheduler is remote).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from ..datasets.base import Dataset, ImageRecord, Pair
from ..core.errors import DitfError
from ..extract.extractor import Extractor, ExtractReport, ExtractSettings
from ..store.feature_store import ROWS_PER_SHARD, FeatureStore

#: images per extraction task: small, so a lost worker costs little and the load stays balanced
DEFAULT_CHUNK = 4


@dataclass(frozen=True)
class AdapterArgs:
    """What a worker needs to build the same adapter as the coordinator (`load_adapter` arguments).

    `device` is resolved on each worker ("auto"/"cuda": the worker's own GPU when workers are
    pinned with CUDA_VISIBLE_DEVICES). `dtype` must be resolved (not "auto"): it is part of
    the stored configuration.
    """

    model: str
    weights: str | None = None
    revision: str | None = None
    dtype: str = "fp32"
    device: str = "auto"
    text_device: str | None = None
    offload: bool = False

    def load(self):
        from ..models import load_adapter

        return load_adapter(self.model, weights=self.weights, revision=self.revision, dtype=self.dtype, device=self.device,
                            text_device=self.text_device, offload=self.offload)


# ---- clusters ------------------------------------------------------------------------------------
def _gpu_ids() -> list[str]:
    """GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (empty without CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA runtime at all
        return []


def local_cluster(n_workers: int, dashboard_address: str | None = None, gpus: Sequence[str] | None = None):
    """A local cluster of `n_workers` single-threaded worker processes.

    With GPUs, worker i sees only GPU i (round robin when there are more workers than GPUs)
    through CUDA_VISIBLE_DEVICES, so each worker's "cuda" is its own device.
    """
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if n_workers < 1:
        raise DitfError("--workers must be at least 1")
    gpus = list(_gpu_ids() if gpus is None else gpus)
    if not gpus:
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=dashboard_address)
    workers = {
        f"gpu{i}-{gpus[i % len(gpus)]}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "host": "127.0.0.1", "env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}},
        }
        for i in range(n_workers)
    }
    # loopback only, like LocalCluster: dask's protocol must never face an untrusted network
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address, "host": "127.0.0.1"}}
    import logging

    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)


#: TLS settings dask reads from its configuration (YAML or DASK_* environment variables)
_TLS_SETTINGS = {
    "distributed.comm.tls.ca-file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "distributed.comm.tls.client.cert": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
    "distributed.comm.tls.client.key": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
}


def scheduler_security(scheduler: str):
    """The `distributed.Security` to reach `scheduler` with, or None for plain TCP.

    dask's wire protocol unpickles what it receives, so whoever can reach a scheduler's port can
    run code on every worker. `tls://` schedulers get mutual TLS from dask's own settings
    (`distributed.comm.tls.*`, e.g. the environment variables in `_TLS_SETTINGS`); a `tcp://`
    scheduler on another host is allowed but warned about: only trusted hosts may reach it.
    """
    import sys
    from urllib.parse import urlsplit

    import dask

    parts = urlsplit(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    if parts.scheme == "tls":
        from distributed import Security

        missing = [env for key, env in _TLS_SETTINGS.items() if not dask.config.get(key, None)]
        if missing:
            raise DitfError(f"--scheduler {scheduler} uses TLS: set dask's TLS settings first ({', '.join(missing)})")
        return Security(require_encryption=True)
    if parts.scheme not in ("tcp", "inproc", "ucx"):
        raise DitfError(f"--scheduler {scheduler}: unknown protocol {parts.scheme!r}; use tls://HOST:PORT or tcp://HOST:PORT")
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", None):
        print(f"warning: {scheduler} is plain TCP: dask unpickles what it receives, so only trusted hosts may reach "
              "that port; prefer tls:// (see docs/scale.md, 'Network safety')", file=sys.stderr)
    return None


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator:
    """A `distributed.Client`: to a running scheduler (`tls://` or `tcp://HOST:PORT`) or to a local cluster."""
    from distributed import Client

    if scheduler and workers:
        raise DitfError("pass either --scheduler (an existing cluster) or --workers (a local one), not both")
    if scheduler:
        security = scheduler_security(scheduler)
        try:
            client = Client(scheduler, timeout="30s", security=security)
        except (OSError, TimeoutError) as exc:
            raise DitfError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from exc
        with client:
            yield client
        return
    with local_cluster(workers or 1) as cluster, Client(cluster) as client:
        yield client


_SHARED: dict[tuple, tuple] = {}


def shared_client(workers: int | None = None, scheduler: str | None = None):
    """One client per (workers, scheduler) for this process, closed at exit (the CLI's `ditf run`
    uses one cluster for extract and every match)."""
    key = (workers, scheduler)
    if key not in _SHARED:
        import atexit

        context = dask_client(workers, scheduler)
        client = context.__enter__()
        _SHARED[key] = (client, context)
        atexit.register(close_shared_clients)
    return _SHARED[key][0]


def close_shared_clients() -> None:
    while _SHARED:
        _, (_, context) = _SHARED.popitem()
        with contextlib.suppress(Exception):
            context.__exit__(None, None, None)


# ---- the worker side ----------------------------------------------------------------------------
#: adapters of this worker process, keyed by their arguments: each worker loads a model once
_ADAPTERS: dict[AdapterArgs, object] = {}


def _worker_adapter(args: AdapterArgs):
    if args not in _ADAPTERS:
        _ADAPTERS[args] = args.load()
    return _ADAPTERS[args]


def release_adapters() -> int:
    """Drop this process's cached models (run on every worker at the end of a run)."""
    n = len(_ADAPTERS)
    _ADAPTERS.clear()
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
    return n


def extract_records(
    args: AdapterArgs, store_path: str, dataset: str, settings: ExtractSettings,
    records: Sequence[ImageRecord], rows: dict[str, int], texts: dict[str, str],
) -> int:
    """Extract `records` into arrays the coordinator created; returns how many were (re)done.

    Reads the completion flags first, so a rescheduled task skips what its lost predecessor
    committed. Prompts come from the store's prompt cache (the coordinator filled it), opened
    read-only: a worker never writes metadata.
    """
    adapter = _worker_adapter(args)
    extractor = Extractor(adapter, FeatureStore(store_path, read_only=True), replace(settings))
    with FeatureStore(store_path) as store:  # closed after each task: the coordinator consolidates at its end
        arrays = {(k, t): store.open_features(dataset, adapter.spec.name, k, t)
                  for t in settings.ts for k in extractor.settings.ks}
        complete = {key: array.complete() for key, array in arrays.items()}
        todo = [r for r in records if not all(complete[key][rows[r.key]] for key in arrays)]
        if not todo:
            return 0
        wanted = {texts[r.key] for r in todo}
        embeddings = extractor.encode_prompts(wanted)  # a read-only cache hit, never an encode
        if set(embeddings) != wanted:
            raise DitfError("prompt embeddings missing from the store's prompt cache (the coordinator encodes them)")
        extractor._extract(todo, rows, texts, embeddings, arrays, complete, progress=False)
        return len(todo)


#: the last block matcher (and the rows its feature cache knows) per feature key on this worker:
#: neighbouring blocks share images
_MATCHERS: dict[tuple, tuple] = {}


def match_block(
    store_path: str, feature_key: tuple[str, str, int, int], settings, channels: Sequence[int],
    block_start: int, pairs: Sequence[Pair], rows: dict[str, int], scope: str | None = None,
) -> int:
    """Predict one block of consecutive pairs and commit it (its own chunk of `pred`/`done`).

    The same code as a local `predict` (`predict.block_matcher`: float16 feature cache, one
    intra-op thread), so the bits are the same.
    """
    from ..match.device import resolve_match_device
    from ..match.paper import paper_matching
    from ..match.executors import run_blocks
    from ..match.predict import block_matcher

    with FeatureStore(store_path) as store:  # closed after each task: the coordinator consolidates at its end
        predictions = store.open_predictions(feature_key, settings.name, scope=scope)
        if predictions.done()[block_start : block_start + len(pairs)].all():
            return 0
        arrays = store.open_features(*feature_key)
        device = resolve_match_device(getattr(settings, "device", "cpu"))
        paper = paper_matching(arrays.config, settings.protocol)  # --precision paper keys: bf16 / fp16 casts
        cache_key = (str(store_path), feature_key, settings.name, settings.cache_bytes, tuple(channels), str(device), paper)
        if cache_key not in _MATCHERS:
            _MATCHERS.clear()
            known_rows: dict[str, int] = {}
            _MATCHERS[cache_key] = known_rows, block_matcher(arrays, known_rows, settings, channels, paper, device)
        known_rows, run_block = _MATCHERS[cache_key]
        known_rows.update(rows)
        for _, out in run_blocks([block_start], lambda _: run_block(pairs)):
            predictions.write(block_start, out)
        return len(pairs)


# ---- the coordinator side -----------------------------------------------------------------------
def _run_tasks(client, futures, sizes: dict, total: int, desc: str, progress: bool) -> int:
    """Wait for every future (first error raised as is), with a progress bar; sum of results."""
    from distributed import as_completed

    from ..core.progress import progress as progress_display

    done = 0
    with progress_display(total, desc, "item", enabled=progress) as bar:
        try:
            for future in as_completed(futures):
                done += future.result()
                bar.update(sizes[future.key])
        except BaseException:
            client.cancel(futures)
            raise
    return done


class DistributedExtractor(Extractor):
    """`Extractor.run` unchanged in the coordinator; the per-image work goes to dask workers."""

    def __init__(self, client, args: AdapterArgs, store: FeatureStore, settings: ExtractSettings,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        if args.dtype == "auto":
            raise DitfError("AdapterArgs.dtype must be resolved (bf16, fp16 or fp32)")
        super().__init__(args.load(), store, settings)  # coordinator: text encoders only, never the DiT
        self.client, self.args, self.chunk_size = client, args, max(1, chunk_size)
        self.dataset_name: str | None = None

    def run(self, dataset: Dataset, progress: bool = True, records: Sequence[ImageRecord] | None = None,
            shard=None) -> ExtractReport:
        self.dataset_name = dataset.name
        try:
            return super().run(dataset, progress=progress, records=records, shard=shard)
        finally:
            self.client.run(release_adapters)

    def _extract(self, todo, rows, texts, embeddings, arrays, complete, progress) -> None:
        # called by Extractor.run after images were registered, arrays created/validated and
        # prompts cached: from here on workers only write chunks of their own images
        chunks = _row_block_chunks(todo, rows, self.chunk_size)
        futures, sizes = [], {}
        for chunk in chunks:
            future = self.client.submit(
                extract_records, self.args, str(self.store.path), self.dataset_name, self.settings, chunk,
                {r.key: rows[r.key] for r in chunk}, {r.key: texts[r.key] for r in chunk}, pure=False,
            )
            futures.append(future)
            sizes[future.key] = len(chunk)
        _run_tasks(self.client, futures, sizes, len(todo), f"extract {self.adapter.spec.name} (dask)", progress)


def _row_block_chunks(todo: Sequence[ImageRecord], rows: dict[str, int], size: int) -> list[list[ImageRecord]]:
    """Tasks of about `size` images that never split a block of ROWS_PER_SHARD rows: a block's
    small arrays are one file, rewritten whole per commit, so only one worker may write it."""
    blocks: dict[int, list[ImageRecord]] = {}
    for record in todo:
        blocks.setdefault(rows[record.key] // ROWS_PER_SHARD, []).append(record)
    chunks: list[list[ImageRecord]] = []
    for block in blocks.values():
        if chunks and len(chunks[-1]) + len(block) <= size:
            chunks[-1].extend(block)
        else:
            chunks.append(list(block))
    return chunks


def extract_distributed(
    client, args: AdapterArgs, store_path, settings: ExtractSettings, dataset: Dataset,
    progress: bool = True, records: Sequence[ImageRecord] | None = None, chunk_size: int = DEFAULT_CHUNK,
    shard=None,
) -> ExtractReport:
    """`Extractor(...).run(dataset)` with the images spread over the client's workers."""
    with FeatureStore(store_path) as store:
        extractor = DistributedExtractor(client, args, store, settings, chunk_size=chunk_size)
        return extractor.run(dataset, progress=progress, records=records, shard=shard)


class DaskExecutor:
    """An executor of a `match.plan.MatchPlan` (`match.executors`): each pending block is a dask
    task (`match_block`) that predicts and commits it in a worker; the coordinator only waits."""

    workers = 1
    runs_fusion = False  # the fusion partner's cache is opened by the coordinator, not the workers

    def __init__(self, client) -> None:
        self.client = client

    def run(self, plan, progress: bool = True) -> int:
        futures, sizes = [], {}
        for start in plan.todo:
            block = plan.block_pairs(start)
            future = self.client.submit(match_block, plan.store_path, plan.feature_key, plan.settings, list(plan.channels),
                                        start, block, plan.rows_of(block), plan.scope, pure=False)
            futures.append(future)
            sizes[future.key] = len(block)
        total = sum(sizes.values())
        _run_tasks(self.client, futures, sizes, total, f"match {plan.settings.name} (dask)", progress)
        return total  # every pair of the blocks is done (some possibly by an earlier, lost attempt)


def predict_distributed(client, store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, settings,
                        overwrite: bool = False, progress: bool = True):
    """`predict(...)` with the blocks of pairs spread over the client's workers."""
    from ..match.predict import predict

    return predict(store, dataset, model, k, t, settings, overwrite=overwrite, progress=progress,
                   executor=DaskExecutor(client))
