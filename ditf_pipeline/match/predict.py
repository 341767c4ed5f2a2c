"""The match stage for pair benchmarks: cached features -> variant -> matcher -> predictions.

Reads only the store (the DiT never runs here), computes each image's feature variant once
(a byte-bounded LRU of float16 maps keeps the working set), matches every pair not predicted
yet, and commits predictions to the store in blocks next to the features, so a rerun is
incremental and a crash loses at most one block.

The stage is a plan plus an executor: `open_inputs` checks the request, `plan_match` decides
what is pending and where it goes (`plan.MatchPlan`), and an executor runs the plan's blocks:
in this thread or a worker pool (`executors`), or on dask workers
(`distributed.runners.DaskExecutor`). No executor reaches into `predict`.

Parallelism (`MatchSettings.jobs`, CLI ``--jobs``): with more than one job on the CPU (and at
least `POOL_MIN_PAIRS` pairs to match) the blocks go to that many workers (`pool`: a thread of
this process and fresh worker processes; each owns a contiguous span of blocks and its own
feature cache, steals from the others' spans when its own is done, and sends the predictions
back). Every block, in any worker, runs torch with ONE intra-op thread: a pair is a few
millisecond-sized kernels, and letting torch split each of them over the cores cost more in
synchronisation than it gained (measured: CPU per pair rose 4x with 2 intra-op threads). It
also makes the predictions bit-identical for every ``--jobs`` (the kernels' summation order
does not depend on how the pairs are spread). The calling process alone writes to the store.
Why processes: worker threads (used before) share the GIL for the Python between kernels: two
of them gave 1.47x at SPair size on two cores, the pool 1.7-1.8x, close to what two fully
independent processes reach there (`benchmarks/bench_predict.py --ceiling`, docs/benchmarks.md).

The pairs of a block that share a target are matched in one batch (`DiftMatcher.best_batch`:
one matrix product for all their keypoints), on the CPU as on a GPU. On a GPU (``--device
cuda``) the feature cache lives on the device (its budget sized for the device, maps uploaded
pinned and non-blocking) and the block's results come back in one copy (no host wait per
target); one job. `ditf_pipeline.fake_cuda` runs this path on a CPU in tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets.base import Dataset, Pair
from ..core.errors import DitfError
from .features import USES_CHANNELS, VECTORS_USED, ChannelMeans, compute_feature  # noqa: F401  (ChannelMeans: re-exported)
from .fusion import PairFusion, parse_fuse
from .inputs import MatchInputs, check_features, open_inputs, resolve_channels  # noqa: F401  (re-exported)
from .cache import ByteLRU
from .dift import split_pixels
from .matchers import make_matcher
from ..core.settings import FEATURE_CACHE_BYTES, MatchSettings
from .paper import PaperDiftMatcher, paper_feature, paper_matching
from .executors import Executor, InThreadExecutor, WorkerPoolExecutor, run_blocks  # noqa: F401  (run_blocks: re-exported)
from .plan import MatchPlan
from .early import WORKER_PRELOAD
from .pool import BlockRunner, WorkerPool
from ..store.feature_store import FeatureArrays, FeatureStore, prediction_scope

#: pairs committed together (one zarr chunk of predictions); DITF_MATCH_BLOCK makes blocks
#: small so that crash tests see several of them
BLOCK = int(os.environ.get("DITF_MATCH_BLOCK") or 256)
#: fewest pairs to match for which more jobs start worker processes: each costs about a second
#: of a core to start (a fresh interpreter importing torch), ~150 pairs' worth of matching;
#: DITF_MATCH_POOL_MIN_PAIRS lowers it for tests
POOL_MIN_PAIRS = int(os.environ.get("DITF_MATCH_POOL_MIN_PAIRS") or 512)


#: rows of a feature map computed together by `FeatureCache` (8 x 40 x 3072 float32 = 3.9 MB)
VARIANT_ROWS = 8


@dataclass
class MatchReport:
    key: str
    n_pairs: int
    matched: int
    skipped: int
    channels: list[int]
    seconds: float
    workers: int = 1  # how many matched (more jobs start workers only for enough pairs: `POOL_MIN_PAIRS`)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor queued to `device` without a host wait (pinned staging, non-blocking copy;
    PyTorch's caching host allocator keeps the staging buffer until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def device_cache_bytes(device: torch.device, default: int = FEATURE_CACHE_BYTES) -> int:
    """Byte budget of the feature cache on `device`: the CPU's `default`, or on a GPU a quarter of
    its free memory (at most 8 GiB: ~1,100 SPair maps, every image of the test split), since
    the CPU's 256 MB would re-read and re-upload a category's images for every pair."""
    if device.type != "cuda":
        return default
    free, _ = torch.cuda.mem_get_info(device)
    return max(default, min(8 * 2**30, free // 4))


class FeatureCache:
    """Variant features of recently used images, each computed once while it stays cached.

    Thread-safe (`ditf view` serves requests from threads). `dtype` is what is kept: float16 for pair
    matching (the authors' script casts the AdaLN feature to float16 at this very point, and it
    halves the memory; the matchers compute in float32), float32 by default for the other
    stages. At most `max_bytes` (and `size` images, when given) stay cached; on `device`.
    """

    def __init__(self, arrays: FeatureArrays, rows: dict[str, int], variant: str, channels: Sequence[int],
                 size: int | None = None, max_bytes: int = FEATURE_CACHE_BYTES, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", compute=compute_feature):
        self.arrays, self.rows, self.variant, self.channels = arrays, rows, variant, list(channels)
        self.dtype, self.device = dtype, torch.device(device)
        self.compute = compute  # `features.compute_feature` (fp32) or `paper.paper_feature` (bf16 -> fp16)
        if size is not None:  # an entry count as well: a bound on whichever comes first
            dim = arrays.hidden_size
            grid = arrays.group["pre_adaln"].shape[1:3]  # the store's largest grid
            max_bytes = min(max_bytes, int(size) * int(grid[0]) * int(grid[1]) * dim * torch.finfo(dtype).bits // 8)
        self._cache = ByteLRU(max_bytes)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def pair(self, src_key: str, trg_key: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The pair-level hook of the driver: (source map, target map, target cache key)."""
        return self(src_key), self(trg_key), trg_key

    def _compute(self, key: str) -> torch.Tensor:
        # (no lock: zarr reads from several threads overlap in its event loop and codec threads)
        pre_adaln, modulation = self.arrays.read_image(self.rows[key], vectors=VECTORS_USED.get(self.variant))
        z = _to_device(torch.from_numpy(np.ascontiguousarray(pre_adaln)), self.device)
        if self.variant == "raw" and z.dtype == self.dtype:
            return z.contiguous()  # the cached z itself (what compute_feature would round back to)
        modulation = {name: _to_device(torch.as_tensor(np.asarray(v)), self.device) for name, v in modulation.items()}
        # every variant is per token: on the CPU computed a few rows at a time into the cached map,
        # so the float32 intermediates stay small (whole-map ones grew the heap by ~100 MB per
        # thread); on a device in one piece (each piece costs kernel launches and an upload of
        # the discarded-channel index)
        out = torch.empty(z.shape, dtype=self.dtype, device=self.device)
        step = VARIANT_ROWS if self.device.type == "cpu" else max(1, z.shape[0])
        for start in range(0, z.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = self.compute(self.variant, z[rows], modulation, self.channels)
        return out

    def __call__(self, key: str) -> torch.Tensor:
        return self._cache.get(key, lambda: self._compute(key))


def pair_matcher(settings: MatchSettings, paper: bool = False):
    """The matcher of the settings' protocol (thread-safe); with `paper`,
    the authors' fp16 `dift` arithmetic (`paper.PaperDiftMatcher`)."""
    if paper:
        return PaperDiftMatcher()
    return make_matcher(settings.protocol, **({"soft_window": settings.soft_window} if settings.protocol == "geoaware" else {}))


def pair_feature_cache(arrays: FeatureArrays, rows: dict[str, int], variant: str, channels: Sequence[int],
                       device: str | torch.device = "cpu", max_bytes: int = FEATURE_CACHE_BYTES,
                       compute=compute_feature) -> FeatureCache:
    """The feature cache of pair matching: float16 variant maps on the matching device (used by
    `predict` and the dask workers alike, so both give the same bits)."""
    return FeatureCache(arrays, rows, variant, channels, max_bytes=max_bytes, dtype=torch.float16, device=device,
                        compute=compute)


PairFeatures = Callable[[str, str], tuple]


def match_pairs(pairs: Sequence[Pair], pair_features: PairFeatures, matcher, batch_by_target: bool = False,
                advance: Callable[[int], object] | None = None) -> list[np.ndarray]:
    """Predictions of consecutive pairs, in order (one block, in one worker).

    `batch_by_target`: pairs sharing a target go through `matcher.best_batch` together (one
    matrix product; on a GPU, one host copy per block); matchers without it go pair by pair.
    Errors name the pair (a batch that fails is redone pair by pair to find it).
    """
    out: list[np.ndarray | None] = [None] * len(pairs)
    todo = list(range(len(pairs)))
    if batch_by_target and hasattr(matcher, "best_batch"):
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(pair.trg_key, []).append(i)
        todo = []
        # the device's results of every group stay there until the block is done: one host copy
        # per block, not one wait per target
        pending: list[tuple[list[int], list[int], int]] = []
        on_device: list[torch.Tensor] = []
        for members in groups.values():
            try:
                sources = []
                for i in members:
                    src, trg, trg_key = pair_features(pairs[i].src_key, pairs[i].trg_key)
                    sources.append((src, pairs[i].src_size, pairs[i].src_kps))
                best, counts = matcher.best_batch(trg, pairs[members[0]].trg_size, sources, trg_key=trg_key)
            except DitfError:
                todo += members  # redone one by one below, for an error that names its pair
                continue
            pending.append((members, counts, int(pairs[members[0]].trg_size[0])))
            if best is not None:
                on_device.append(best)
            if advance is not None:
                advance(len(members))
        host = torch.cat(on_device).cpu().numpy() if on_device else np.zeros(0, dtype=np.int64)
        start = 0
        for members, counts, width in pending:
            stop = start + sum(counts)
            for i, result in zip(members, split_pixels(host[start:stop], counts, width)):
                out[i] = result
            start = stop
    # pairs that share a target back to back: its float32 copy and norms are reused while hot in
    # the core's cache (each pair's result is its own: the order changes no bit)
    for i in sorted(todo, key=lambda i: (pairs[i].trg_key, i)):
        pair = pairs[i]
        try:
            src, trg, trg_key = pair_features(pair.src_key, pair.trg_key)
            out[i] = matcher.match(src, pair.src_size, trg, pair.trg_size, pair.src_kps, trg_key=trg_key)
        except DitfError as exc:
            raise DitfError(f"pair {pair.pair_id}: {exc}") from exc
        if advance is not None:
            advance(1)
    return out  # type: ignore[return-value]


def block_matcher(arrays: FeatureArrays, rows: dict[str, int], settings: MatchSettings, channels: Sequence[int],
                  paper: bool, device: torch.device, fusion: PairFusion | None = None,
                  advance: Callable[[int], object] | None = None) -> BlockRunner:
    """The function that predicts one block of pairs: the settings' feature cache and matcher,
    built once and kept for every block (in `predict` and in each worker process alike)."""
    matcher = pair_matcher(settings, paper)
    budget = settings.cache_bytes
    if budget == FEATURE_CACHE_BYTES:  # the default: sized for the device
        budget = device_cache_bytes(device)
    features = pair_feature_cache(arrays, rows, settings.variant, channels, device, budget,
                                  compute=paper_feature if paper else compute_feature)
    pair_features = features.pair if fusion is None else fusion.bind(features)
    # pairs sharing a target go through one matrix product (on the CPU too: one pass over the
    # target map serves all their keypoints, and its float32 copy is made once per group)
    batch = fusion is None
    return lambda block: match_pairs(block, pair_features, matcher, batch, advance)


@dataclass(frozen=True)
class WorkerBlockMatcher:
    """What a worker process needs to build the same `block_matcher` as `predict` (picklable:
    it opens the store itself, read-only)."""

    store: str
    feature_key: tuple[str, str, int, int]
    rows: dict[str, int]
    settings: MatchSettings
    channels: tuple[int, ...]
    paper: bool

    def __call__(self) -> BlockRunner:
        torch.set_num_threads(1)  # in the worker's own thread: the setting is per thread with OpenMP
        arrays = FeatureStore(self.store, read_only=True).open_features(*self.feature_key)
        return block_matcher(arrays, self.rows, self.settings, self.channels, self.paper, torch.device("cpu"))


def open_fusion(store: FeatureStore, dataset: Dataset, rows: dict[str, int], pairs: Sequence[Pair], fuse: str,
                pca_dim: int, device: str | torch.device = "cpu") -> PairFusion:
    """The `--fuse MODEL` partner: its raw features in the same store, checked for every image of the
    pairs, cached on the matching `device` (fusion concatenates them with the DiT's maps there)."""
    if pca_dim < 0:
        raise DitfError(f"--pca-dim must be 0 (no PCA) or positive, got {pca_dim}")
    model, k, t = parse_fuse(fuse)
    k, t = store.find_feature_key(dataset.name, model, k, t)
    arrays = store.open_features(dataset.name, model, k, t)
    check_features(pairs, rows, arrays)
    return PairFusion(model=model, k=k, t=t, pca_dim=pca_dim, other=FeatureCache(arrays, rows, "raw", [], device=device),
                      config=arrays.config)


def plan_match(store: FeatureStore, dataset: Dataset, inputs: MatchInputs, settings: MatchSettings,
               stack: contextlib.ExitStack, overwrite: bool = False) -> MatchPlan:
    """The plan of the match stage: channels resolved, the predictions group opened (or made) under
    its lock, held on `stack` until the caller's executor is done, and the blocks still pending."""
    arrays, rows, pairs, device = inputs.arrays, inputs.rows, inputs.pairs, inputs.device
    channels = resolve_channels(settings.channels, arrays, settings.channel_sample) if settings.variant in USES_CHANNELS else []
    attrs = {
        "variant": settings.variant,
        "protocol": settings.protocol,
        "soft_window": settings.soft_window,
        "channels": channels,
        "features": arrays.config,
    }
    paper = paper_matching(arrays.config, settings.protocol)  # --precision paper: the authors' bf16 / fp16 casts
    if paper:
        attrs["precision"] = "paper"
    fusion = None
    if settings.fuse:
        fusion = open_fusion(store, dataset, rows, pairs, settings.fuse, settings.pca_dim, device)
        attrs.update(variant=settings.label, fuse=fusion.describe())
    max_kps = max(len(p.src_kps) for p in pairs)
    pair_ids = [p.pair_id for p in pairs]
    scope = prediction_scope(dataset.split, pair_ids)
    part = inputs.shard
    # this group is ours alone (or this shard's) from before it is opened or recreated to its last block
    stack.enter_context(store.predictions_lock(inputs.feature_key, settings.name, scope,
                                               None if part.whole else str(part)))
    predictions = store.open_predictions(inputs.feature_key, settings.name, pair_ids, max_kps, attrs, block=BLOCK,
                                         scope=scope, overwrite=overwrite)
    done = predictions.done()
    mine = set(part.blocks(len(pairs), BLOCK))
    todo = [s for s in range(0, len(pairs), BLOCK) if s in mine and not done[s : s + BLOCK].all()]
    worker_runner = None
    if fusion is None:
        needed = {key for s in todo for p in pairs[s : s + BLOCK] for key in (p.src_key, p.trg_key)}
        worker_runner = WorkerBlockMatcher(str(store.path), inputs.feature_key, {key: rows[key] for key in needed},
                                           settings, tuple(channels), paper)
    return MatchPlan(
        store_path=str(store.path), feature_key=inputs.feature_key, settings=settings, pairs=pairs, rows=rows,
        channels=channels, block=BLOCK, todo=todo, scope=scope, predictions=predictions,
        local_runner=functools.partial(block_matcher, arrays, rows, settings, channels, paper, device, fusion),
        worker_runner=worker_runner,
    )


def local_executor(jobs: int, n_pairs: int) -> InThreadExecutor | WorkerPoolExecutor:
    """How this process runs a plan: `jobs` workers for at least `POOL_MIN_PAIRS` pairs (their
    processes start now, and boot while the plan is made), else this thread."""
    if jobs > 1 and n_pairs >= POOL_MIN_PAIRS:
        return WorkerPoolExecutor(WorkerPool(jobs, preload=WORKER_PRELOAD), POOL_MIN_PAIRS)
    return InThreadExecutor()


def early_executor(settings: MatchSettings, n_pairs: int, pool: WorkerPool | None) -> WorkerPoolExecutor | None:
    """The executor of `pool` (started by `early.early_pool` before the start-up) when the run
    will use it; else None, with the pool closed (its processes killed while still booting).

    The checks `early_pool` could not make: at least `POOL_MIN_PAIRS` pairs, and a device that
    is the CPU ("auto" may have found CUDA)."""
    if pool is None:
        return None
    from .device import resolve_match_device

    try:
        on_cpu = resolve_match_device(settings.device).type == "cpu"
    except DitfError:
        on_cpu = False  # a bad --device is refused by the stage itself, with its own message
    if not on_cpu or n_pairs < POOL_MIN_PAIRS:
        pool.close()
        return None
    return WorkerPoolExecutor(pool, POOL_MIN_PAIRS)


def predict(
    store: FeatureStore,
    dataset: Dataset,
    model: str,
    k: int,
    t: int,
    settings: MatchSettings,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> MatchReport:
    """Predict every pair of `dataset` from the cached features of (model, k, t).

    Checks the request (`open_inputs`), makes the plan (`plan_match`) and hands it to `executor`:
    by default this thread or a pool of worker processes (`local_executor`, by ``--jobs``);
    `distributed.runners.DaskExecutor` spreads the blocks over dask workers.
    """
    start = time.perf_counter()
    inputs = open_inputs(store, dataset, model, k, t, settings, overwrite)
    if settings.fuse and executor is not None and not executor.runs_fusion:
        raise DitfError("--fuse is not supported by the distributed match runner yet")
    with contextlib.ExitStack() as stack:
        if executor is None:
            executor = stack.enter_context(local_executor(inputs.jobs, len(inputs.pairs)))
        plan = plan_match(store, dataset, inputs, settings, stack, overwrite)
        matched = executor.run(plan, progress)
    return MatchReport(
        key=plan.predictions.path, n_pairs=len(plan.pairs), matched=matched, skipped=len(plan.pairs) - matched,
        channels=plan.channels, seconds=time.perf_counter() - start, workers=executor.workers,
    )
