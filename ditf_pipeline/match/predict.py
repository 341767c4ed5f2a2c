"""The match stage for pair benchmarks: cached features -> variant -> matcher -> predictions.

Reads only the store (the DiT never runs here), computes each image's feature variant once
(a byte-bounded LRU of float16 maps keeps the working set), matches every pair not predicted
yet, and commits predictions to the store in blocks next to the features, so a rerun is
incremental and a crash loses at most one block.

Parallelism (`MatchSettings.jobs`, CLI ``--jobs``): blocks of pairs go to `jobs` worker
threads that share the feature cache and the matcher's per-target caches, each with ONE
intra-op torch thread. Why threads with one intra-op thread each: a pair is a few
millisecond-sized torch kernels (they release the GIL), and letting torch split each of them
over the cores cost more in synchronisation than it gained (measured: CPU per pair rose
4x with 2 intra-op threads). Matching always runs with one intra-op thread, whatever the job
count, so the predictions are bit-identical for every ``--jobs`` (the kernels' summation
order does not depend on how the pairs are spread). The main thread alone writes to the store.

On a GPU (``--device cuda``) the feature cache lives on the device and the pairs of a block
that share a target are matched in one batch (`DiftMatcher.match_batch`); one job.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets.base import Dataset, Pair
from ..errors import DitfError
from .features import (
    MASSIVE_RATIO,
    USES_CHANNELS,
    VECTORS_USED,
    ChannelMeans,
    check_variant_applies,
    compute_feature,
    variant_names,
)
from .fusion import PairFusion, parse_fuse
from .matchers import ByteLRU, make_matcher, resolve_match_device
from ..naming import fusion_label, prediction_name
from .paper import PaperDiftMatcher, paper_feature, paper_matching
from ..shards import Shard
from ..store.feature_store import FeatureArrays, FeatureStore, prediction_scope
from ..validate import unknown

#: pairs committed together (one zarr chunk of predictions); DITF_MATCH_BLOCK makes blocks
#: small so that crash tests see several of them
BLOCK = int(os.environ.get("DITF_MATCH_BLOCK") or 256)
#: default byte budget of the variant feature cache (float16 40x30x3072 maps are 7.4 MB: ~34
#: images; an SPair category has ~27, and its pairs are consecutive)
FEATURE_CACHE_BYTES = 256 * 2**20


#: rows of a feature map computed together by `FeatureCache` (8 x 40 x 3072 float32 = 3.9 MB)
VARIANT_ROWS = 8


def default_jobs() -> int:
    """The cores this process may run on (``--jobs`` default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class MatchSettings:
    variant: str = "adaln+cd"
    protocol: str = "dift"
    channels: str = "auto"  # "auto" or comma-separated channel indices
    soft_window: int | None = None  # geoaware only
    channel_sample: int = 32  # images used to detect massive channels for "auto"
    fuse: str | None = None  # partner model (e.g. "dinov2-b14"), concatenated per pair (`fusion`)
    pca_dim: int = 1280  # PCA of the DiT part over each pair before fusing (0: none)
    jobs: int | None = None  # worker threads (None: every core); CPU only
    device: str = "cpu"  # auto | cpu | cuda | cuda:N
    cache_bytes: int = FEATURE_CACHE_BYTES  # budget of the variant feature cache
    shard: str | None = None  # "i/N": only blocks b with b mod N == i (job arrays, `shards.Shard`)

    @property
    def label(self) -> str:
        """The variant as results name it: with `fuse`, ``<variant>+<model>-pca<dim>``."""
        return fusion_label(self.variant, self.fuse, self.pca_dim)

    @property
    def name(self) -> str:
        """Store key of these predictions: variant/protocol (soft-argmax window appended)."""
        return prediction_name(self.variant, self.protocol, self.soft_window, self.fuse, self.pca_dim)


@dataclass
class MatchReport:
    key: str
    n_pairs: int
    matched: int
    skipped: int
    channels: list[int]
    seconds: float


def resolve_channels(spec: str, arrays: FeatureArrays, sample: int = 32) -> list[int]:
    """`--channels`: explicit indices, or "auto": the 100x-median criterion on cached z.

    "auto" reads the channels stored in the key (`ditf analyze` or an earlier match wrote them);
    otherwise it detects them once, on the first `sample` complete images with a running
    per-channel mean (one image in memory at a time), and stores them in the key with how they
    were found, so every later match of the key reuses the same set without re-reading images.
    A read-only store gets the detection without the write.
    """
    spec = spec.strip()
    if spec == "auto":
        if arrays.massive_channels is not None:
            return arrays.massive_channels
        rows = np.flatnonzero(arrays.complete())[:sample]
        if len(rows) == 0:
            return []
        means = ChannelMeans(arrays.hidden_size)
        for row in rows:
            means.add(arrays.read_image(int(row), vectors=())[0])
        channels = means.massive(MASSIVE_RATIO)
        info = {"criterion": f"mean |z| over tokens > {MASSIVE_RATIO:g} x median of the channel means",
                "images": int(len(rows)), "tokens": int(means.tokens), "by": "ditf match --channels auto"}
        try:
            arrays.set_massive_channels(channels, info)
        except (DitfError, OSError, PermissionError, ValueError):
            pass  # a read-only store: detect again next time
        return channels
    if spec in ("", "none"):
        return []
    try:
        channels = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise DitfError(f"--channels must be 'auto', 'none' or comma-separated integers, got {spec!r}") from None
    bad = [c for c in channels if not 0 <= c < arrays.hidden_size]
    if bad:  # checked here, before a rerun with --overwrite deletes anything
        raise DitfError(f"--channels {bad[0]} is out of range: the features have channels 0..{arrays.hidden_size - 1}")
    return channels


class FeatureCache:
    """Variant features of recently used images, each computed once while it stays cached.

    Thread-safe (the match workers share it). `dtype` is what is kept: float16 for pair
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
        z = torch.from_numpy(np.ascontiguousarray(pre_adaln)).to(self.device)
        if self.variant == "raw" and z.dtype == self.dtype:
            return z.contiguous()  # the cached z itself (what compute_feature would round back to)
        modulation = {name: torch.as_tensor(np.asarray(v)).to(self.device) for name, v in modulation.items()}
        # every variant is per token: computed a few rows at a time into the cached map, so the
        # float32 intermediates stay small (whole-map ones grew the heap by ~100 MB per thread)
        out = torch.empty(z.shape, dtype=self.dtype, device=self.device)
        for start in range(0, z.shape[0], VARIANT_ROWS):
            rows = slice(start, start + VARIANT_ROWS)
            out[rows] = self.compute(self.variant, z[rows], modulation, self.channels)
        return out

    def __call__(self, key: str) -> torch.Tensor:
        return self._cache.get(key, lambda: self._compute(key))


def pair_matcher(settings: MatchSettings, paper: bool = False):
    """The matcher of the settings' protocol (thread-safe: shared by the workers); with `paper`,
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
    """Predictions of consecutive pairs, in order (one block; runs in a worker thread).

    `batch_by_target` (GPU): pairs sharing a target go through `matcher.match_batch` together.
    Errors name the pair (a batch that fails is redone pair by pair to find it).
    """
    out: list[np.ndarray | None] = [None] * len(pairs)
    todo = list(range(len(pairs)))
    if batch_by_target and hasattr(matcher, "match_batch"):
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(pair.trg_key, []).append(i)
        todo = []
        for members in groups.values():
            try:
                sources = []
                for i in members:
                    src, trg, trg_key = pair_features(pairs[i].src_key, pairs[i].trg_key)
                    sources.append((src, pairs[i].src_size, pairs[i].src_kps))
                results = matcher.match_batch(trg, pairs[members[0]].trg_size, sources, trg_key=trg_key)
            except DitfError:
                todo += members  # redone one by one below, for an error that names its pair
                continue
            for i, result in zip(members, results):
                out[i] = result
            if advance is not None:
                advance(len(members))
    for i in sorted(todo):
        pair = pairs[i]
        try:
            src, trg, trg_key = pair_features(pair.src_key, pair.trg_key)
            out[i] = matcher.match(src, pair.src_size, trg, pair.trg_size, pair.src_kps, trg_key=trg_key)
        except DitfError as exc:
            raise DitfError(f"pair {pair.pair_id}: {exc}") from exc
        if advance is not None:
            advance(1)
    return out  # type: ignore[return-value]


def run_blocks(block_starts: Sequence[int], run_block: Callable[[int], list], jobs: int):
    """Yield (block_start, predictions) as blocks finish, computed by `jobs` worker threads.

    Every worker (and the calling thread while it waits) runs torch with one intra-op thread;
    the caller's setting is restored at the end. At most 2 x jobs blocks are in flight, so
    neighbouring blocks (which share images) are matched together and memory stays bounded.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if jobs <= 1 or len(block_starts) <= 1:
            for start in block_starts:
                yield start, run_block(start)
            return
        with ThreadPoolExecutor(max_workers=min(jobs, len(block_starts)), initializer=torch.set_num_threads,
                                initargs=(1,), thread_name_prefix="ditf-match") as pool:
            pending: dict = {}
            queue = list(block_starts)
            try:
                while queue or pending:
                    while queue and len(pending) < 2 * jobs:
                        start = queue.pop(0)
                        pending[pool.submit(run_block, start)] = start
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in sorted(finished, key=lambda f: pending[f]):
                        start = pending.pop(future)
                        yield start, future.result()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(previous)


def check_features(pairs: Sequence[Pair], rows: dict[str, int], arrays: FeatureArrays) -> None:
    complete = arrays.complete()
    missing = sorted({key for p in pairs for key in (p.src_key, p.trg_key) if key not in rows or not complete[rows[key]]})
    if missing:
        raise DitfError(
            f"{len(missing)} image(s) of the pairs have no features in {arrays.path} (e.g. {missing[0]}): "
            "run `ditf extract` with the same dataset and split first"
        )


def open_fusion(store: FeatureStore, dataset: Dataset, rows: dict[str, int], pairs: Sequence[Pair], fuse: str,
                pca_dim: int) -> PairFusion:
    """The `--fuse MODEL` partner: its raw features in the same store, checked for every image of the pairs."""
    if pca_dim < 0:
        raise DitfError(f"--pca-dim must be 0 (no PCA) or positive, got {pca_dim}")
    model, k, t = parse_fuse(fuse)
    k, t = store.find_feature_key(dataset.name, model, k, t)
    arrays = store.open_features(dataset.name, model, k, t)
    check_features(pairs, rows, arrays)
    return PairFusion(model=model, k=k, t=t, pca_dim=pca_dim, other=FeatureCache(arrays, rows, "raw", []),
                      config=arrays.config)


def predict(
    store: FeatureStore,
    dataset: Dataset,
    model: str,
    k: int,
    t: int,
    settings: MatchSettings,
    overwrite: bool = False,
    progress: bool = True,
    block_runner=None,
) -> MatchReport:
    """Predict every pair of `dataset` from the cached features of (model, k, t).

    `block_runner(todo_blocks, pairs, rows, channels) -> n_matched`, when given, predicts the
    blocks elsewhere once the prediction arrays exist (`ditf_pipeline.distributed.runners`: dask workers).
    """
    from ..progress import progress as progress_display

    start = time.perf_counter()
    part = Shard.parse(settings.shard)
    if overwrite and not part.whole:
        raise DitfError("--overwrite with --shard would let one shard delete another's predictions: "
                        "run `ditf match --overwrite` once without --shard (or not at all), then the shards")
    device = resolve_match_device(settings.device)
    if settings.jobs is not None and int(settings.jobs) < 1:
        raise DitfError(f"--jobs must be at least 1, got {settings.jobs}")
    if settings.variant not in variant_names():
        raise unknown("variant", settings.variant, variant_names())
    make_matcher(settings.protocol)  # validates the protocol name before any work
    if dataset.task != "pairs":
        raise DitfError(f"dataset {dataset.name} is a {dataset.task} benchmark, not keypoint pairs")
    arrays = store.open_features(dataset.name, model, k, t)
    rows = store.image_rows(dataset.name)
    pairs = dataset.pairs()
    if not pairs:
        raise DitfError(f"dataset {dataset.name} at {dataset.root} has no pairs")
    check_features(pairs, rows, arrays)
    check_variant_applies(settings.variant, bool(arrays.modulation_names))
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
        if block_runner is not None:
            raise DitfError("--fuse is not supported by the distributed match runner yet")
        fusion = open_fusion(store, dataset, rows, pairs, settings.fuse, settings.pca_dim)
        attrs.update(variant=settings.label, fuse=fusion.describe())
    feature_key = (dataset.name, model, k, t)
    # one job on a GPU (the device is the parallel part) and with --fuse (its seeded low-rank PCA
    # forks the process-global RNG, which two threads must not do at once)
    jobs = 1 if device.type != "cpu" or fusion is not None else max(1, int(settings.jobs or default_jobs()))
    max_kps = max(len(p.src_kps) for p in pairs)
    pair_ids = [p.pair_id for p in pairs]
    predictions = store.open_predictions(feature_key, settings.name, pair_ids, max_kps, attrs, block=BLOCK,
                                         scope=prediction_scope(dataset.split, pair_ids), overwrite=overwrite)
    done = predictions.done()
    matcher = pair_matcher(settings, paper)
    features = pair_feature_cache(arrays, rows, settings.variant, channels, device, settings.cache_bytes,
                                  compute=paper_feature if paper else compute_feature)
    pair_features = features.pair if fusion is None else fusion.bind(features)
    mine = set(part.blocks(len(pairs), BLOCK))
    todo_blocks = [s for s in range(0, len(pairs), BLOCK) if s in mine and not done[s : s + BLOCK].all()]
    matched = 0
    if block_runner is not None:
        matched = block_runner(todo_blocks, pairs, rows, channels)
        todo_blocks = []
    batch = device.type != "cpu" and fusion is None
    with progress_display(sum(len(pairs[s : s + BLOCK]) for s in todo_blocks), f"match {settings.name}", "pair",
                          enabled=progress) as bar:

        def run_block(block_start: int) -> list[np.ndarray]:
            return match_pairs(pairs[block_start : block_start + BLOCK], pair_features, matcher, batch, bar.update)

        with contextlib.closing(run_blocks(todo_blocks, run_block, jobs)) as finished:
            for block_start, out in finished:
                predictions.write(block_start, out)  # the main thread alone writes
                matched += len(out)
    return MatchReport(
        key=predictions.path, n_pairs=len(pairs), matched=matched,
        skipped=len(pairs) - matched, channels=channels, seconds=time.perf_counter() - start,
    )
