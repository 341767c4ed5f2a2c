"""Keypoint transfer between two cached feature maps, under the benchmarks' two matching rules.

``dift`` (DIFT / DiTF public scripts): both feature maps are upsampled bilinearly
(align_corners=False) to their ORIGINAL image sizes, the source vector is the upsampled source
feature at the integer keypoint (row y, column x), the prediction is the target pixel of highest
cosine (first maximum in row-major order, as ``torch.argmax``), in original target pixels.

    Materialising a 3072 x 500 x 375 upsampled map costs 2.3 GB and seconds per pair, so
    `DiftMatcher` never builds it. Bilinear upsampling is linear, hence
    (a) the source vector is a 4-tap weighted sum of low-resolution cells,
    (b) the numerators <s, t_p> are the upsampled map of the low-resolution dot products
        <s, g_j> (one ``F.interpolate`` of an (N, 1, h, w) map: the very same weights), and
    (c) |t_p|^2 is a quadratic form of the bilinear weights over Gram entries of neighbouring
        cells (self, right, down, down-right, anti-diagonal), computed once per TARGET image
        and cached, since many pairs share a target.
    `match_dift_reference` is the naive computation, kept for tests (benchmarks/bench_match.py
    judges both against a float64 referee).

``geoaware`` (GeoAware-SC, github.com/Junyi42/GeoAware-SC): see `GeoAwareMatcher`.

The argmax upsamples every score map in float32 by default, as the authors' code does
(``materialise``). ``DITF_MATCH_UPSAMPLE=pruned`` (or `DiftMatcher(upsample="pruned")`) takes the
exact CPU method instead: float32 bounds per feature cell, float64 samples only where the maximum
can be; it agrees with a float64 referee at least as often, but is not faster yet
(`benchmarks/bench_pruned.py`), so it is not the default. Otherwise all arithmetic is float32, on the device the feature maps live on (the CPU by default; pass
CUDA tensors to match on a GPU: every step stays on the device, one copy of the predictions
comes back). Matchers are thread-safe (`ditf view` serves requests from threads; scratch buffers
are per thread); their caches are bounded in bytes, not entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DitfError
from ..core.naming import PROTOCOL_RULES
from .taps import LinearTaps, linear_taps, upsampled_norms, upsampled_vectors  # noqa: F401  (public here too)

#: (width, height) of an original image, as in `datasets.base.Pair`
ImageSize = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _as_grid(feature: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """A (h, w, D) float32 contiguous tensor on the feature's own device (accepts float16 caches
    and numpy arrays)."""
    grid = torch.as_tensor(feature)
    if grid.ndim != 3:
        raise DitfError(f"{what} feature map must be (h, w, D), got shape {tuple(grid.shape)}")
    return grid.to(torch.float32).contiguous()


def _check_grid(feature: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """A (h, w, D) tensor in its cached dtype (float16 stays float16: only what is read is converted)."""
    grid = torch.as_tensor(feature)
    if grid.ndim != 3:
        raise DitfError(f"{what} feature map must be (h, w, D), got shape {tuple(grid.shape)}")
    return grid


def _check_size(size: ImageSize, what: str) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise DitfError(f"{what} image size must be positive (width, height), got {tuple(size)}")
    return width, height


def _integer_keypoints(keypoints: np.ndarray, size: ImageSize) -> tuple[np.ndarray, np.ndarray]:
    """Round (N, 2) (x, y) keypoints to pixels and check they lie inside the source image.

    SPair-71k keypoints are integers already; others are rounded to the nearest pixel.
    """
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    width, height = size
    xs, ys = np.rint(kps[:, 0]), np.rint(kps[:, 1])
    bad = ~(np.isfinite(kps).all(axis=1) & (xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DitfError(
            f"source keypoint {i} at (x={kps[i, 0]:g}, y={kps[i, 1]:g}) lies outside the source image "
            f"of {width}x{height} pixels"
        )
    return xs.astype(np.int64), ys.astype(np.int64)


def nbytes(value) -> int:
    """Memory held by a cached value: tensors, arrays, and tuples/lists/dicts of them."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if dataclasses.is_dataclass(value):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class ByteLRU:
    """A least-recently-used cache bounded by the bytes its values hold; thread-safe.

    Why bytes: the values are feature maps and per-target maps whose size varies with the image,
    and the match stage's memory promise (about 1 GB at SPair size) is a byte promise. A key
    being computed by one thread is waited for by the others (computed once, never twice at a
    time); a value larger than the whole budget is returned but not kept. `hits` and `misses`
    count lookups (for tests and benchmarks).
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[object], int] = nbytes) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.sizeof = sizeof
        self._items: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._pending: dict = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable | None, compute: Callable[[], object]):
        if key is None or self.max_bytes == 0:
            return compute()
        while True:
            with self._lock:
                if key in self._items:
                    self.hits += 1
                    self._items.move_to_end(key)
                    return self._items[key]
                event = self._pending.get(key)
                if event is None:  # this thread computes the value
                    self.misses += 1
                    event = self._pending[key] = threading.Event()
                    break
            event.wait()  # another thread computes it; look again (it may have failed or been evicted)
        try:
            value = compute()
            self._put(key, value)
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            event.set()

    def _put(self, key: Hashable, value) -> None:
        size = self.sizeof(value)
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = value
            self._sizes[key] = size
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                self.bytes -= self._sizes.pop(old)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.bytes = 0


# ---------------------------------------------------------------------------------------------
# dift protocol
# ---------------------------------------------------------------------------------------------



class _Scratch(threading.local):
    """Per-thread reusable buffers (grown when too small, never shrunk)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}  # buffer name -> the tensor it holds a copy of

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
            self.copied.pop(name, None)
        return buffer[:numel]

    def copy_of(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` converted to `dtype` in buffer `name`; no copy when the buffer already holds
        this very tensor (feature maps are never changed in place; the tensor itself is kept,
        not its address: a freed tensor's memory could hold another one)."""
        buffer = self.get(name, tensor.numel(), dtype, tensor.device).view(tensor.shape)
        if self.copied.get(name) is not tensor:
            buffer.copy_(tensor)
            self.copied[name] = tensor
        return buffer


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch on one intra-op thread in the calling thread (the setting is per thread), the
    caller's setting restored at the end.

    How pairs are matched on the CPU (`predict`, `ditf view`): a pair is a few small kernels
    that gain nothing from being split over cores, and a matmul split over several threads
    sums in another order, so that a near tie of an argmax could flip between runs.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: score buffer of `DiftMatcher` on the CPU: as many keypoints per pass as fit (one at least)
CPU_SCORE_BYTES = 4 * 2**20

#: default byte budgets of the matchers' per-target caches (`ByteLRU`)
DIFT_CACHE_BYTES = 64 * 2**20  # 1 / |t_p| at 500 x 375 is 0.75 MB: ~85 targets (an SPair category has ~27)
GEOAWARE_CACHE_BYTES = 192 * 2**20  # 3600 x 3072 float32 descriptors are 44 MB: 4 targets

#: how `DiftMatcher` finds the best pixel: ``materialise`` (the default) upsamples every score
#: map in float32, as the authors' code; ``pruned`` (CPU only) bounds each feature cell by its
#: corners and samples only the cells that can hold the maximum, in float64. CUDA maps always
#: take the materialised path.
UPSAMPLE_MODES = ("pruned", "materialise")


def resolve_upsample(mode: str | None = None) -> str:
    """The argmax method: `mode`, else the ``DITF_MATCH_UPSAMPLE`` environment variable, else ``materialise``."""
    chosen = (mode or os.environ.get("DITF_MATCH_UPSAMPLE") or "materialise").strip().lower()
    if chosen not in UPSAMPLE_MODES:
        raise DitfError(f"unknown upsample method {chosen!r}; use {' or '.join(UPSAMPLE_MODES)} (DITF_MATCH_UPSAMPLE)")
    return chosen


#: one prediction request of `DiftMatcher.match_batch`: (source map, source size, source keypoints)
SourceRequest = tuple["torch.Tensor | np.ndarray", ImageSize, np.ndarray]


class DiftMatcher:
    """The ``dift`` protocol for a driver that loops over pairs.

    Per target image it caches 1 / max(|t_p|, 1e-12) at full resolution (keyed by
    `trg_key`; None disables caching; at most `cache_bytes`), which is the only per-pixel
    quantity that does not depend on the source keypoint. Float16 maps are read as they are
    cached: only the source cells a keypoint reads and the target map are converted to float32.
    """

    protocol = "dift"
    threshold_rule = PROTOCOL_RULES["dift"]

    def __init__(self, cache_bytes: int = DIFT_CACHE_BYTES, upsample: str | None = None) -> None:
        self.upsample = resolve_upsample(upsample)
        self._inverse_norms = ByteLRU(cache_bytes)
        self._scratch = _Scratch()

    def _target_inverse_norm(self, trg: torch.Tensor, trg_size: ImageSize, trg_key: Hashable | None) -> torch.Tensor:
        key = None if trg_key is None else (trg_key, tuple(trg.shape), trg_size, str(trg.device))
        return self._inverse_norms.get(key, lambda: 1.0 / upsampled_norms(trg, trg_size).clamp_min(1e-12))

    def _source_vectors(self, src_feat, src_img_size: ImageSize, src_kps: np.ndarray,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        src = _check_grid(src_feat, "source")
        src_size = _check_size(src_img_size, "source")
        xs, ys = _integer_keypoints(src_kps, src_size)
        if len(xs) == 0:
            return torch.zeros(0, src.shape[-1], device=src.device, dtype=dtype or torch.float32)
        return upsampled_vectors(src, src_size, xs, ys, dtype)  # (N, D) float32 unless asked

    def _float_target(self, trg_grid: torch.Tensor) -> torch.Tensor:
        """The target map in float32, converted into this thread's reusable buffer.

        Why a buffer: a fresh 15 MB map per pair (plus two 7.5 MB score maps) is what made
        the glibc heap of a long run grow to twice the live memory."""
        if trg_grid.dtype == torch.float32 and trg_grid.is_contiguous():
            return trg_grid
        return self._scratch.copy_of("target", trg_grid, torch.float32)

    def _best_pixels(self, source_vectors: torch.Tensor, trg: torch.Tensor, trg_size: ImageSize,
                     trg_key: Hashable | None) -> torch.Tensor:
        """(N,) flat index of the first maximum cosine in the upsampled target, on the device."""
        if self.upsample == "pruned" and trg.device.type == "cpu":
            return self._best_pixels_pruned(source_vectors, trg, trg_size, trg_key)
        h, w, d = trg.shape
        width, height = trg_size
        n = len(source_vectors)
        inverse_norm = self._target_inverse_norm(trg, trg_size, trg_key).reshape(1, -1)
        dots = (source_vectors @ trg.reshape(h * w, d).T).reshape(n, 1, h, w)
        # F.interpolate(dots, size=(height, width), mode="bilinear", align_corners=False), written
        # into this thread's score buffer (the same kernel F.interpolate calls), a few keypoints
        # at a time on the CPU: each keypoint's plane is computed alone by the kernel, so the bits
        # are the same, and a score buffer that stays in the core's cache makes the three passes
        # over it (upsample, scale, argmax) 5 % faster alone and 10 % with two processes at once
        per_pass = n if trg.device.type != "cpu" else max(1, CPU_SCORE_BYTES // (4 * height * width))
        per_pass = min(n, per_pass)
        scores = self._scratch.get("scores", per_pass * height * width, torch.float32, trg.device)
        best = torch.empty(n, dtype=torch.long, device=trg.device)
        for start in range(0, n, per_pass):
            stop = min(n, start + per_pass)
            plane = scores[: (stop - start) * height * width].view(stop - start, 1, height, width)
            torch._C._nn.upsample_bilinear2d(dots[start:stop], (height, width), False, None, None, out=plane)
            torch.argmax(plane.view(stop - start, -1).mul_(inverse_norm), dim=1, out=best[start:stop])
        return best

    def _best_pixels_pruned(self, source_vectors: torch.Tensor, trg: torch.Tensor, trg_size: ImageSize,
                            trg_key: Hashable | None) -> torch.Tensor:
        """`_best_pixels` on the CPU without the upsampled score map (`pruned`): float32 bounds,
        float64 dots and samples only in the blocks that can hold the maximum."""
        from .pruned import pruned_argmax, target_blocks

        h, w, d = trg.shape
        key = None if trg_key is None else ("pruned", trg_key, tuple(trg.shape), trg_size)
        blocks = self._inverse_norms.get(key, lambda: target_blocks(trg, trg_size))
        return torch.from_numpy(pruned_argmax(source_vectors, trg.reshape(h * w, d), blocks))

    @torch.inference_mode()
    def match(
        self,
        src_feat: torch.Tensor | np.ndarray,
        src_img_size: ImageSize,
        trg_feat: torch.Tensor | np.ndarray,
        trg_img_size: ImageSize,
        src_kps: np.ndarray,
        trg_key: Hashable | None = None,
    ) -> np.ndarray:
        """(N, 2) float64 predicted (x, y) in original target pixels for (N, 2) source (x, y)."""
        return self.match_batch(trg_feat, trg_img_size, [(src_feat, src_img_size, src_kps)], trg_key)[0]

    @torch.inference_mode()
    def match_batch(
        self,
        trg_feat: torch.Tensor | np.ndarray,
        trg_img_size: ImageSize,
        sources: Sequence[SourceRequest],
        trg_key: Hashable | None = None,
    ) -> list[np.ndarray]:
        """Every source of `sources` against one target: one matmul, one upsampling, one argmax.

        On a GPU this is how pairs are batched (pairs sharing a target, `predict` groups them);
        each row's score is computed exactly as `match` would, but a batched matmul may round
        differently from a single one, so the CPU driver calls `match` per pair.
        """
        best, counts = self.best_batch(trg_feat, trg_img_size, sources, trg_key)
        if best is None:
            return [np.zeros((0, 2)) for _ in sources]
        return split_pixels(best.cpu().numpy(), counts, _check_size(trg_img_size, "target")[0])  # the one device -> host copy

    @torch.inference_mode()
    def best_batch(
        self,
        trg_feat: torch.Tensor | np.ndarray,
        trg_img_size: ImageSize,
        sources: Sequence[SourceRequest],
        trg_key: Hashable | None = None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """`match_batch` without the host copy: the flat best-pixel indices of every keypoint of
        every source, on the target's device (None when there is no keypoint), and the count of
        keypoints per source. The GPU pair loop gathers a whole block of these, then copies once."""
        trg_grid = _check_grid(trg_feat, "target")
        trg_size = _check_size(trg_img_size, "target")
        # the pruned CPU path reads float64 source vectors (the referee's); the others float32
        dtype = torch.float64 if self.upsample == "pruned" and trg_grid.device.type == "cpu" else None
        vectors = []
        for src_feat, src_size, kps in sources:
            v = self._source_vectors(src_feat, src_size, kps, dtype)
            if v.shape[-1] != trg_grid.shape[-1]:
                raise DitfError(f"source and target features differ in width ({v.shape[-1]} vs {trg_grid.shape[-1]})")
            vectors.append(v.to(trg_grid.device))
        counts = [len(v) for v in vectors]
        if sum(counts) == 0:
            return None, counts
        trg = self._float_target(trg_grid)
        return self._best_pixels(torch.cat(vectors) if len(vectors) > 1 else vectors[0], trg, trg_size, trg_key), counts

    def clear_cache(self) -> None:
        self._inverse_norms.clear()


def split_pixels(best: np.ndarray, counts: Sequence[int], width: int) -> list[np.ndarray]:
    """Flat row-major pixel indices -> one (n, 2) float64 (x, y) array per source of `counts`."""
    xy = np.stack([best % width, best // width], axis=1).astype(np.float64)
    return list(np.split(xy, np.cumsum(counts)[:-1])) if len(counts) > 1 else [xy]


@torch.inference_mode()
def dift_reference_similarity(
    src_feat: torch.Tensor | np.ndarray,
    src_img_size: ImageSize,
    trg_feat: torch.Tensor | np.ndarray,
    trg_img_size: ImageSize,
    src_kps: np.ndarray,
    channel_chunk: int | None = 256,
) -> torch.Tensor:
    """Naive cosine maps (N, H, W): F.interpolate both maps to full size, normalise, dot.

    `channel_chunk` bounds memory by upsampling a slice of channels at a time (None: all at
    once, 2.3 GB per 3072 x 500 x 375 map); numerators and squared norms are accumulated.
    """
    src, trg = _as_grid(src_feat, "source"), _as_grid(trg_feat, "target")
    src_size, trg_size = _check_size(src_img_size, "source"), _check_size(trg_img_size, "target")
    xs, ys = _integer_keypoints(src_kps, src_size)
    d = src.shape[-1]
    chunk = d if channel_chunk is None else channel_chunk
    (sw, sh), (tw, th) = src_size, trg_size
    numerators = torch.zeros(len(xs), th * tw)
    source_sq = torch.zeros(len(xs))
    target_sq = torch.zeros(th * tw)
    ys_t, xs_t = torch.as_tensor(ys), torch.as_tensor(xs)
    for start in range(0, d, chunk):
        part = slice(start, min(start + chunk, d))
        src_up = F.interpolate(src[..., part].permute(2, 0, 1)[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
        vectors = src_up[:, ys_t, xs_t].T  # (N, C)
        del src_up
        trg_up = F.interpolate(trg[..., part].permute(2, 0, 1)[None], size=(th, tw), mode="bilinear", align_corners=False)[0]
        flat = trg_up.reshape(trg_up.shape[0], -1)
        numerators += vectors @ flat
        source_sq += (vectors * vectors).sum(1)
        target_sq += (flat * flat).sum(0)
        del trg_up, flat
    cosine = numerators / source_sq.sqrt().clamp_min(1e-12)[:, None] / target_sq.sqrt().clamp_min(1e-12)[None]
    return cosine.reshape(len(xs), th, tw)


def match_dift_reference(
    src_feat: torch.Tensor | np.ndarray,
    src_img_size: ImageSize,
    trg_feat: torch.Tensor | np.ndarray,
    trg_img_size: ImageSize,
    src_kps: np.ndarray,
    channel_chunk: int | None = 256,
) -> np.ndarray:
    """The naive ``dift`` matcher: (N, 2) predicted (x, y), first maximum in row-major order."""
    cosine = dift_reference_similarity(src_feat, src_img_size, trg_feat, trg_img_size, src_kps, channel_chunk)
    width = int(trg_img_size[0])
    best = cosine.reshape(cosine.shape[0], -1).argmax(dim=1).numpy()
    return np.stack([best % width, best // width], axis=1).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# nearest neighbours (exact; FAISS or a matmul)
# ---------------------------------------------------------------------------------------------

#: CPU backend for plain cosine NN; benchmarks/bench_match.py measured torch faster for the
#: 60x60 geoaware grid (FAISS' numpy round trip costs more than the search itself).
CPU_NN_BACKEND = "torch"

#: On a GPU, ``auto`` hands a search to FAISS-GPU from this many query x database scores on
#: (2^24: a 64 MB float32 score matrix; below it one matmul + argmax on the device is a
#: single kernel pair and cannot lose much). A starting value, NOT measured on a GPU:
#: `benchmarks/bench_match.py --device cuda` times both sides to tune it.
FAISS_GPU_MIN_SCORES = 2**24


def nearest_neighbours(queries: torch.Tensor, database: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index (N,) of the largest inner product of each query row against the database rows.

    Both backends are exact, and the result stays on the queries' device. ``auto``: on a CUDA
    device, FAISS-GPU (reading the torch tensors in place, no host copy) when faiss sees a GPU
    and the search has at least `FAISS_GPU_MIN_SCORES` scores, else a matmul on the device;
    on the CPU `CPU_NN_BACKEND`. ``faiss`` on CPU tensors: `faiss.knn` through numpy.
    Ties: torch returns the first maximum; FAISS does not promise an order among equal scores.
    """
    if backend == "auto":
        large = len(queries) * len(database) >= FAISS_GPU_MIN_SCORES
        backend = "faiss" if queries.is_cuda and large and faiss_gpus() > 0 else ("torch" if queries.is_cuda else CPU_NN_BACKEND)
    if backend == "torch":
        return (queries @ database.T).argmax(dim=1)
    if backend != "faiss":
        raise DitfError(f"unknown nearest-neighbour backend {backend!r}; choose auto, torch or faiss")
    if queries.is_cuda and faiss_gpus() > 0:
        return faiss_gpu_search(queries, database)[:, 0]
    import faiss

    xq = np.ascontiguousarray(queries.float().cpu().numpy(), dtype=np.float32)
    xb = np.ascontiguousarray(database.float().cpu().numpy(), dtype=np.float32)
    _, index = faiss.knn(xq, xb, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(index[:, 0].astype(np.int64)).to(queries.device)


@functools.cache
def faiss_gpus() -> int:
    """GPUs faiss can use (0 without faiss or with faiss-cpu); asked once per process."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@functools.cache
def gpu_resources():
    """The process's one `faiss.StandardGpuResources` (temporary memory, streams, cuBLAS handle):
    building one per search allocates and frees GPU memory every call."""
    import faiss

    return faiss.StandardGpuResources()


def faiss_gpu_search(queries: torch.Tensor, database: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(N, k) int64 indices of the k largest inner products, FAISS brute force on CUDA tensors.

    `faiss.contrib.torch_utils` lets `faiss.knn_gpu` read the tensors where they are and write
    its results into torch tensors on the same device, on PyTorch's current stream.
    """
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (patches faiss.knn_gpu to take torch tensors)

    device = queries.device.index if queries.device.index is not None else torch.cuda.current_device()
    _, index = faiss.knn_gpu(gpu_resources(), queries.float().contiguous(), database.float().contiguous(), k,
                             metric=faiss.METRIC_INNER_PRODUCT, device=device)
    return index


def mutual_nearest_neighbours(desc_a: torch.Tensor, desc_b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(M, 2) index pairs (i in a, j in b) that are each other's cosine nearest neighbour, on the
    descriptors' device (HPatches' matching rule; `homography.mutual_nearest_neighbours` is the
    numpy twin used on the CPU)."""
    a = desc_a / torch.linalg.vector_norm(desc_a, dim=1, keepdim=True).clamp_min(1e-12)
    b = desc_b / torch.linalg.vector_norm(desc_b, dim=1, keepdim=True).clamp_min(1e-12)
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(0, 2, dtype=torch.int64, device=a.device)
    nn12 = nearest_neighbours(a, b, backend)
    nn21 = nearest_neighbours(b, a, backend)
    ids = torch.arange(len(a), device=a.device)
    keep = nn21[nn12] == ids
    return torch.stack([ids[keep], nn12[keep]], dim=1)


def resolve_match_device(spec: str = "auto") -> torch.device:
    """``auto`` -> the GPU when torch sees one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    The match stage's own resolver (match imports nothing from the model adapters).
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DitfError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DitfError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DitfError(f"--device {spec}: torch sees no CUDA GPU here; use --device cpu")
    return device


# ---------------------------------------------------------------------------------------------
# geoaware protocol
# ---------------------------------------------------------------------------------------------

GEOAWARE_FRAME = 840  # pixels, square
GEOAWARE_GRID = 60  # cells per side
GEOAWARE_STRIDE = GEOAWARE_FRAME // GEOAWARE_GRID  # 14
GEOAWARE_TEMPERATURE = 0.02


@dataclass(frozen=True)
class GeoAwareFrame:
    """Where an image sits in the 840 x 840 frame (GeoAware-SC `resize` / `preprocess_kps_pad`).

    The long side is resized to 840 (scale = 840 / max(W, H)), the short side to
    round(840 * short / long), and the image is centred with zero padding:
    frame = original * scale + offset.
    """

    scale: float
    offset_x: int
    offset_y: int
    content_width: int
    content_height: int

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """Original (x, y) -> frame (x, y), in float32 as GeoAware-SC computes it."""
        points = np.asarray(points, dtype=np.float32)
        return points * np.float32(self.scale) + np.array([self.offset_x, self.offset_y], dtype=np.float32)

    def to_original(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return (points - np.array([self.offset_x, self.offset_y])) / self.scale


def geoaware_frame(size: ImageSize, frame: int = GEOAWARE_FRAME) -> GeoAwareFrame:
    width, height = _check_size(size, "image")
    scale = frame / max(width, height)
    if height < width:
        content_h = int(np.around(frame * height / width))
        return GeoAwareFrame(scale, 0, int((frame - content_h) / 2), frame, content_h)
    if width < height:
        content_w = int(np.around(frame * width / height))
        return GeoAwareFrame(scale, int((frame - content_w) / 2), 0, content_w, frame)
    return GeoAwareFrame(scale, 0, 0, frame, frame)


def geoaware_threshold_scale(trg_size: ImageSize) -> float:
    """Factor GeoAware-SC applies to the PCK threshold (alpha * bbox max side) in its frame.

    Predictions and ground truth are mapped into the frame by the same uniform scale, so
    error_frame < alpha * base * scale  <=>  error_original < alpha * base: scoring in
    original pixels with the strict rule is the same test (exact in real arithmetic; the two
    float computations could only disagree within an ulp of the boundary).
    """
    return geoaware_frame(trg_size).scale


def frame_cell_features(grid: torch.Tensor, size: ImageSize, cells_y: torch.Tensor, cells_x: torch.Tensor) -> torch.Tensor:
    """Our feature map resampled at 60 x 60 frame cells (cells_y, cells_x): (M, D) float32.

    Our cache holds the feature map of the un-padded image on its own token grid, GeoAware-SC
    has one descriptor per 14-pixel cell of the padded 840 frame. A cell's centre 14 * idx + 7
    (a continuous frame coordinate: GeoAware assigns pixel coordinate x to cell floor(x / 14))
    is mapped back into the original image, X = (centre - offset) / scale, and the map is
    sampled bilinearly there with the align_corners=False convention (cell j of w covers
    [j W / w, (j + 1) W / w)), clamped at the border as F.interpolate does. A cell whose whole
    14-pixel span lies in the zero padding gets a zero vector (cosine 0 with everything); a
    cell straddling the image edge is sampled at its clamped centre, so a keypoint near the
    border never gets an empty descriptor.
    """
    frame = geoaware_frame(size)
    width, height = size
    cy = cells_y.to(grid.device, torch.float64)
    cx = cells_x.to(grid.device, torch.float64)
    centre_x = cx * GEOAWARE_STRIDE + GEOAWARE_STRIDE / 2
    centre_y = cy * GEOAWARE_STRIDE + GEOAWARE_STRIDE / 2
    orig_x = (centre_x - frame.offset_x) / frame.scale
    orig_y = (centre_y - frame.offset_y) / frame.scale
    sample = torch.stack([2 * orig_x / width - 1, 2 * orig_y / height - 1], dim=-1).to(torch.float32)
    sampled = F.grid_sample(
        grid.permute(2, 0, 1)[None], sample[None, None], mode="bilinear", padding_mode="border", align_corners=False
    )[0, :, 0].T  # (M, D)
    span_x0, span_y0 = cx * GEOAWARE_STRIDE, cy * GEOAWARE_STRIDE
    overlaps = (
        (span_x0 + GEOAWARE_STRIDE > frame.offset_x)
        & (span_x0 < frame.offset_x + frame.content_width)
        & (span_y0 + GEOAWARE_STRIDE > frame.offset_y)
        & (span_y0 < frame.offset_y + frame.content_height)
    )
    return sampled.mul_(overlaps[:, None].to(torch.float32))  # in place: the same product, no 44 MB copy


def _normalise(vectors: torch.Tensor) -> torch.Tensor:
    """GeoAware-SC's normalisation: x / (|x| + 1e-10) (zero vectors stay zero)."""
    return vectors / (torch.linalg.vector_norm(vectors, dim=-1, keepdim=True) + 1e-10)


def window_soft_argmax(
    similarity: torch.Tensor, window: int = 0, temperature: float = GEOAWARE_TEMPERATURE, grid: int = GEOAWARE_GRID
) -> torch.Tensor:
    """GeoAware-SC's soft evaluation (`get_flow` + `soft_argmax`), (N, 2) cell coordinates (x, y).

    For a window w > 0 (full width, odd: GeoAware's SOFT_EVAL_WINDOW=7 is w=15), similarities
    outside the w x w square around the hard argmax are MULTIPLIED BY ZERO (not removed: they
    still enter the softmax with value 0, as in their code); then softmax(sim / temperature)
    over all cells, expected x and y over linspace(-1, 1, grid), mapped back by
    (v + 1) * (grid - 1) / 2 and clamped to [0, grid - 1]. w = 0 is the plain soft-argmax.
    """
    n = similarity.shape[0]
    if window > 0:
        half = window // 2
        best = similarity.argmax(dim=1)
        offsets = torch.arange(-half, half + 1, device=similarity.device)
        ys = ((best // grid)[:, None] + offsets).clamp(0, grid - 1)
        xs = ((best % grid)[:, None] + offsets).clamp(0, grid - 1)
        mask = torch.zeros(n, grid, grid, device=similarity.device)
        mask[torch.arange(n, device=similarity.device)[:, None, None], ys[:, :, None], xs[:, None, :]] = 1
        similarity = similarity * mask.reshape(n, -1)
    shifted = similarity - similarity.max(dim=1, keepdim=True).values
    weights = torch.exp(shifted / temperature)
    weights = (weights / weights.sum(dim=1, keepdim=True)).reshape(n, grid, grid)
    coords = torch.linspace(-1, 1, grid, dtype=torch.float64).to(similarity.device, torch.float32)
    x = (weights.sum(dim=1) * coords).sum(dim=1)
    y = (weights.sum(dim=2) * coords).sum(dim=1)
    cells = torch.stack([x, y], dim=1)
    return ((cells + 1) * (grid - 1) / 2).clamp(0, grid - 1)


class GeoAwareMatcher:
    """The ``geoaware`` protocol (GeoAware-SC's `compute_pck` / `calculate_keypoint_transformation`).

    Source keypoints go into the 840 frame (x * scale + offset, float32) and to the cell
    floor(60 / 840 * x); its descriptor is matched against the 60 x 60 target descriptors
    (`frame_cell_features`, normalised as GeoAware does) by hard cosine argmax or, with
    `soft_window` (11 or 15; 0 = no window), by the window soft-argmax at `temperature`. The
    cell (x, y) becomes the frame point 14 * cell + 7 and is mapped back to ORIGINAL target
    pixels (it may fall in the padding, i.e. outside the image). Score with the strict rule
    "<" (see `geoaware_threshold_scale`). Normalised target descriptors are cached per
    `trg_key` (3600 x D float32 each: 44 MB at D = 3072; at most `cache_bytes`).
    """

    protocol = "geoaware"
    threshold_rule = PROTOCOL_RULES["geoaware"]

    def __init__(
        self,
        soft_window: int | None = None,
        temperature: float = GEOAWARE_TEMPERATURE,
        nn_backend: str = "auto",
        cache_bytes: int = GEOAWARE_CACHE_BYTES,
    ) -> None:
        if soft_window is not None and (soft_window < 0 or (soft_window > 0 and soft_window % 2 == 0)):
            raise DitfError(f"soft_window must be an odd window width (e.g. 11 or 15) or 0, got {soft_window}")
        self.soft_window = soft_window
        self.temperature = temperature
        self.nn_backend = nn_backend
        self._targets = ByteLRU(cache_bytes)
        self._scratch = _Scratch()

    def _float_map(self, grid: torch.Tensor, name: str) -> torch.Tensor:
        """A float16 map in float32, in this thread's reusable buffer (see `DiftMatcher._float_target`)."""
        if grid.dtype == torch.float32 and grid.is_contiguous():
            return grid
        return self._scratch.copy_of(name, grid, torch.float32)

    def _target_descriptors(self, trg_grid: torch.Tensor, trg_size: ImageSize, trg_key: Hashable | None) -> torch.Tensor:
        def compute() -> torch.Tensor:
            trg = self._float_map(trg_grid, "target")  # converted only when the descriptors are not cached
            cells = torch.arange(GEOAWARE_GRID * GEOAWARE_GRID, device=trg.device)
            descriptors = frame_cell_features(trg, trg_size, cells // GEOAWARE_GRID, cells % GEOAWARE_GRID)
            norms = torch.linalg.vector_norm(descriptors, dim=-1, keepdim=True)
            return descriptors.div_(norms.add_(1e-10))  # `_normalise`, in place

        key = None if trg_key is None else (trg_key, tuple(trg_grid.shape), trg_size, str(trg_grid.device))
        return self._targets.get(key, compute)

    def source_cells(self, src_img_size: ImageSize, src_kps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """GeoAware's `kpts_to_patch_idx`: cell = int(60 / 840 * frame coordinate), in float32."""
        size = _check_size(src_img_size, "source")
        kps = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
        _integer_keypoints(kps, size)  # validation only: geoaware keeps sub-pixel keypoints
        in_frame = geoaware_frame(size).to_frame(kps)
        cells = (in_frame * np.float32(GEOAWARE_GRID / GEOAWARE_FRAME)).astype(np.int32).clip(0, GEOAWARE_GRID - 1)
        return torch.from_numpy(cells[:, 1].astype(np.int64)), torch.from_numpy(cells[:, 0].astype(np.int64))

    @torch.inference_mode()
    def match(
        self,
        src_feat: torch.Tensor | np.ndarray,
        src_img_size: ImageSize,
        trg_feat: torch.Tensor | np.ndarray,
        trg_img_size: ImageSize,
        src_kps: np.ndarray,
        trg_key: Hashable | None = None,
    ) -> np.ndarray:
        """(N, 2) float64 predicted (x, y) in original target pixels."""
        src, trg = _check_grid(src_feat, "source"), _check_grid(trg_feat, "target")
        src_size, trg_size = _check_size(src_img_size, "source"), _check_size(trg_img_size, "target")
        cells_y, cells_x = self.source_cells(src_size, src_kps)
        if len(cells_y) == 0:
            return np.zeros((0, 2))
        queries = _normalise(frame_cell_features(self._float_map(src, "source"), src_size, cells_y, cells_x))
        targets = self._target_descriptors(trg, trg_size, trg_key)
        if self.soft_window is None:
            best = nearest_neighbours(queries, targets, self.nn_backend)
            cells = torch.stack([best % GEOAWARE_GRID, best // GEOAWARE_GRID], dim=1).to(torch.float32)
        else:
            cells = window_soft_argmax(queries @ targets.T, self.soft_window, self.temperature)
        in_frame = cells.cpu().numpy().astype(np.float64) * GEOAWARE_STRIDE + GEOAWARE_STRIDE // 2
        return geoaware_frame(trg_size).to_original(in_frame)

    def clear_cache(self) -> None:
        self._targets.clear()


Matcher = DiftMatcher | GeoAwareMatcher


def make_matcher(protocol: str, **options) -> Matcher:
    """The matcher of a protocol by name (``dift`` or ``geoaware``)."""
    if protocol == "dift":
        return DiftMatcher(**options)
    if protocol == "geoaware":
        return GeoAwareMatcher(**options)
    from ..validate import unknown

    raise unknown("matching protocol", protocol, list(PROTOCOL_RULES), "protocols")
