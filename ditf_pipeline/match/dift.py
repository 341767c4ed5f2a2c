"""The ``dift`` keypoint-transfer protocol between two cached feature maps (`DiftMatcher`).

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

The other protocol, ``geoaware``, is `geoaware.GeoAwareMatcher`; `matchers.make_matcher` picks one by name.

The argmax evaluates every upsampled score in float32 by default, as the authors' code does
(``materialise``): on the CPU one pixel row at a time in a compiled loop (`kernels`, numba), on
a GPU through torch's upsampling kernel. ``DITF_MATCH_UPSAMPLE=pruned`` (or
`DiftMatcher(upsample="pruned")`) takes the exact CPU method instead: float32 bounds per feature
cell, float64 samples only where the maximum can be (`pruned`); it agrees with a float64 referee
at least as often, but on flat score maps it samples most blocks and is slower
(`benchmarks/bench_pruned.py`), so it is not the default. All other arithmetic is float32, on
the device the feature maps live on (the CPU by default; pass CUDA tensors to match on a GPU:
every step stays on the device, one copy of the predictions comes back). Pairs that share a
target are matched together (`match_batch`: one matrix product for all their keypoints, on the
CPU as on a GPU). Matchers are thread-safe (`ditf view` serves requests from threads; scratch
buffers are per thread); their caches are bounded in bytes, not entries.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DitfError
from ..core.naming import PROTOCOL_RULES
from .cache import ByteLRU
from .grids import ImageSize, as_float_grid, check_grid, check_size, integer_keypoints
from . import kernels
from .taps import linear_taps, upsampled_norms, upsampled_vectors
from .threads import ScratchBuffers


#: score buffer of `DiftMatcher` on the CPU: as many keypoints per pass as fit (one at least)
CPU_SCORE_BYTES = 4 * 2**20

#: default byte budget of `DiftMatcher`'s per-target cache (`ByteLRU`)
DIFT_CACHE_BYTES = 64 * 2**20  # 1 / |t_p| at 500 x 375 is 0.75 MB: ~85 targets (an SPair category has ~27)

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
        self._scratch = ScratchBuffers()

    def _target_inverse_norm(self, trg: torch.Tensor, trg_size: ImageSize, trg_key: Hashable | None) -> torch.Tensor:
        key = None if trg_key is None else (trg_key, tuple(trg.shape), trg_size, str(trg.device))
        return self._inverse_norms.get(key, lambda: 1.0 / upsampled_norms(trg, trg_size).clamp_min(1e-12))

    def _source_vectors(self, src_feat, src_img_size: ImageSize, src_kps: np.ndarray,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        src = check_grid(src_feat, "source")
        src_size = check_size(src_img_size, "source")
        xs, ys = integer_keypoints(src_kps, src_size)
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
        if trg.device.type == "cpu" and kernels.available():
            # the same float32 scores, one pixel row at a time in a compiled loop (`kernels`)
            rows, cols = linear_taps(h, height), linear_taps(w, width)
            return torch.from_numpy(kernels.upsampled_argmax(dots.numpy().reshape(n, h, w), rows, cols,
                                                              inverse_norm.numpy().reshape(height, width)))
        # F.interpolate(dots, size=(height, width), mode="bilinear", align_corners=False), written
        # into this thread's score buffer (the same kernel F.interpolate calls), a few keypoints
        # at a time on the CPU: each keypoint's plane is computed alone by the kernel, so the bits
        # are the same, and a score buffer that stays in the core's cache makes the three passes
        # over it (upsample, scale, argmax) 5 % faster alone and 10 % with two processes at once
        per_pass = n if trg.device.type != "cpu" else max(1, CPU_SCORE_BYTES // (4 * height * width))
        per_pass = min(n, per_pass)
        scores = self._scratch.get("scores", per_pass * height * width, torch.float32, trg.device)
        best = torch.empty(n, dtype=torch.long, device=trg.device)
        on_cpu = trg.device.type == "cpu"
        for start in range(0, n, per_pass):
            stop = min(n, start + per_pass)
            plane = scores[: (stop - start) * height * width].view(stop - start, 1, height, width)
            torch._C._nn.upsample_bilinear2d(dots[start:stop], (height, width), False, None, None, out=plane)
            cosine = plane.view(stop - start, -1).mul_(inverse_norm)
            if on_cpu:
                # numpy's argmax is the same rule (first maximum; a NaN counts as the maximum, as
                # in torch) but SIMD-vectorised: about 14x faster than torch.argmax on one core
                np.argmax(cosine.numpy(), axis=1, out=best.numpy()[start:stop])
            else:
                torch.argmax(cosine, dim=1, out=best[start:stop])
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

        This is how the pair loop batches pairs sharing a target (`predict.match_pairs`), on the
        CPU and on a GPU: the target's float32 copy and norms are made once, and one matrix product
        of all their keypoints reads the target map once (a (10, 3072) x (3072, 1200) product runs
        at ~38 GFLOP/s on one core, a (250, 3072) one at ~87: its cost was reading the map). Each
        row's score is the one `match` computes; BLAS may round a batched product differently
        from a single one (MKL on the test VM gives the same bits from two rows up).
        """
        best, counts = self.best_batch(trg_feat, trg_img_size, sources, trg_key)
        if best is None:
            return [np.zeros((0, 2)) for _ in sources]
        return split_pixels(best.cpu().numpy(), counts, check_size(trg_img_size, "target")[0])  # the one device -> host copy

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
        trg_grid = check_grid(trg_feat, "target")
        trg_size = check_size(trg_img_size, "target")
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
    src, trg = as_float_grid(src_feat, "source"), as_float_grid(trg_feat, "target")
    src_size, trg_size = check_size(src_img_size, "source"), check_size(trg_img_size, "target")
    xs, ys = integer_keypoints(src_kps, src_size)
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
