"""The ``dift`` argmax without the upsampled score map: bound each feature cell, sample only where
the maximum can still be.

The score at target pixel p is  num(p) / |t_p|,  where num is the bilinear upsampling
(align_corners=False) of the low-resolution dot products D = <s, g_ij> and |t_p| the norm of the
upsampled target vector (`matchers.upsampled_norms`). Pixels whose taps start at the same grid
cell (i, j) form a rectangular BLOCK; their num is a convex combination of the block's four
corner dots D[i, j], D[i, j+1], D[i+1, j], D[i+1, j+1] (neighbours clamped at the border, as the
taps are), so num <= M = max corner. Hence every score in the block is at most
M / min|t_p| when M >= 0, and at most M / max|t_p| when M < 0. Blocks are visited from the
highest bound down and sampled exactly; the search stops at the first block whose bound is
below the best score found. A block whose bound EQUALS the best is still sampled: it may hold
an equal score at an earlier pixel, and the first maximum in row-major order wins.

Everything after the matmul is float64 (float64 taps, norms and samples), the arithmetic of the
float64 referee of `benchmarks/bench_match.py`: the result agrees with it at least as often as
the materialised float32 path. Bounds carry a margin of a few float64 roundings, so rounding
can never prune the block that holds the maximum. When many blocks stay candidates (flat or
tied maps), the whole map is sampled at once: the same samples, fewer Python steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: beyond this many candidate blocks for one keypoint the whole map is sampled in one pass
DENSE_BLOCKS = 48

#: relative margin of a bound, in units of its largest corner magnitude: covers the few
#: float64 roundings of a bilinear sample (weights summing to 1 + a few ulps), far below any
#: difference an argmax could resolve
BOUND_MARGIN = 1e-12


@dataclass(frozen=True)
class TargetBlocks:
    """What a target image needs for pruned argmaxes, computed once per target (cached).

    Rows/columns of pixels are grouped by their first tap; block (i, j) covers pixel rows
    y_start[i]:y_end[i] and columns x_start[j]:x_end[j] (empty where no pixel starts at cell i
    or j, as when downsampling)."""

    norms: np.ndarray  # (H, W) float64 |t_p|, clamped at 1e-300
    row0: np.ndarray  # (H,) int64 first row tap;  row1 the second (clamped at the border)
    row1: np.ndarray
    a0: np.ndarray  # (H,) float64 row weights
    a1: np.ndarray
    col0: np.ndarray  # (W,) int64
    col1: np.ndarray
    b0: np.ndarray  # (W,) float64 column weights
    b1: np.ndarray
    y_start: np.ndarray  # (h,) int64
    y_end: np.ndarray
    x_start: np.ndarray  # (w,) int64
    x_end: np.ndarray
    cell_row1: np.ndarray  # (h,) second row tap of block row i (i + 1, or i at the border)
    cell_col1: np.ndarray  # (w,)
    min_norm: np.ndarray  # (h, w) float64 smallest |t_p| in the block (inf when empty)
    max_norm: np.ndarray  # (h, w) float64 largest |t_p| in the block
    empty: np.ndarray  # (h, w) bool


def _segments(first: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each cell's run in a non-decreasing array of first taps."""
    ids = np.arange(cells)
    return np.searchsorted(first, ids, "left"), np.searchsorted(first, ids, "right")


def _block_extremes(norms: np.ndarray, y_start, y_end, x_start, x_end) -> tuple[np.ndarray, np.ndarray]:
    """Per-block min and max of the norms (inf / -inf where a block is empty)."""
    h, w = len(y_start), len(x_start)
    lo, hi = np.full((h, w), np.inf), np.full((h, w), -np.inf)
    rows = np.flatnonzero(y_end > y_start)
    cols = np.flatnonzero(x_end > x_start)
    if len(rows) == 0 or len(cols) == 0:
        return lo, hi
    # runs of non-empty segments tile the pixels in order, so reduceat over their starts is exact
    by_row_lo = np.minimum.reduceat(norms, y_start[rows], axis=0)
    by_row_hi = np.maximum.reduceat(norms, y_start[rows], axis=0)
    lo[np.ix_(rows, cols)] = np.minimum.reduceat(by_row_lo, x_start[cols], axis=1)
    hi[np.ix_(rows, cols)] = np.maximum.reduceat(by_row_hi, x_start[cols], axis=1)
    return lo, hi


def target_blocks(grid: torch.Tensor, size: tuple[int, int]) -> TargetBlocks:
    """`TargetBlocks` of a (h, w, D) target map shown at `size` = (width, height)."""
    from .matchers import linear_taps, upsampled_norms

    width, height = size
    h, w, _ = grid.shape
    rows = linear_taps(h, height, "cpu", torch.float64)
    cols = linear_taps(w, width, "cpu", torch.float64)
    norms = upsampled_norms(grid.to("cpu", torch.float64), size).clamp_min(1e-300).numpy()
    row0, col0 = rows.index0.numpy(), cols.index0.numpy()
    y_start, y_end = _segments(row0, h)
    x_start, x_end = _segments(col0, w)
    lo, hi = _block_extremes(norms, y_start, y_end, x_start, x_end)
    cells_h, cells_w = np.arange(h), np.arange(w)
    return TargetBlocks(
        norms=norms, row0=row0, row1=rows.index1.numpy(), a0=rows.weight0.numpy(), a1=rows.weight1.numpy(),
        col0=col0, col1=cols.index1.numpy(), b0=cols.weight0.numpy(), b1=cols.weight1.numpy(),
        y_start=y_start, y_end=y_end, x_start=x_start, x_end=x_end,
        cell_row1=np.minimum(cells_h + 1, h - 1), cell_col1=np.minimum(cells_w + 1, w - 1),
        min_norm=lo, max_norm=hi, empty=~np.isfinite(lo),
    )


def block_bounds(dots: np.ndarray, blocks: TargetBlocks) -> np.ndarray:
    """(N, h, w) upper bound of the score in each block, margin included (-inf when empty)."""
    r1, c1 = blocks.cell_row1, blocks.cell_col1
    down = np.maximum(dots, dots[:, r1])
    corner_max = np.maximum(down, down[:, :, c1])
    up = np.minimum(dots, dots[:, r1])
    corner_min = np.minimum(up, up[:, :, c1])
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = np.where(corner_max >= 0, corner_max / blocks.min_norm, corner_max / blocks.max_norm)
        magnitude = np.maximum(np.abs(corner_max), np.abs(corner_min)) / blocks.min_norm
    bound = bound + BOUND_MARGIN * magnitude
    bound[:, blocks.empty] = -np.inf
    return bound


def _sample_block(dots: np.ndarray, blocks: TargetBlocks, i: int, j: int) -> tuple[float, int]:
    """Best score and its flat pixel index in block (i, j) (first maximum in row-major order)."""
    y0, y1, x0, x1 = blocks.y_start[i], blocks.y_end[i], blocks.x_start[j], blocks.x_end[j]
    r0, r1 = blocks.row0[y0], blocks.row1[y0]
    c0, c1 = blocks.col0[x0], blocks.col1[x0]
    a0, a1 = blocks.a0[y0:y1, None], blocks.a1[y0:y1, None]
    b0, b1 = blocks.b0[x0:x1], blocks.b1[x0:x1]
    # every pixel of a block has the same four cells (index1 is a function of index0)
    top = b0 * dots[r0, c0] + b1 * dots[r0, c1]
    bottom = b0 * dots[r1, c0] + b1 * dots[r1, c1]
    scores = (a0 * top + a1 * bottom) / blocks.norms[y0:y1, x0:x1]
    k = int(np.argmax(scores))
    ly, lx = divmod(k, x1 - x0)
    return float(scores.flat[k]), (y0 + ly) * len(blocks.b0) + x0 + lx


def _sample_all(dots: np.ndarray, blocks: TargetBlocks) -> int:
    """Flat index of the first maximum over every pixel (the same samples as `_sample_block`)."""
    top = dots[blocks.row0][:, blocks.col0] * blocks.b0 + dots[blocks.row0][:, blocks.col1] * blocks.b1
    bottom = dots[blocks.row1][:, blocks.col0] * blocks.b0 + dots[blocks.row1][:, blocks.col1] * blocks.b1
    scores = (blocks.a0[:, None] * top + blocks.a1[:, None] * bottom) / blocks.norms
    return int(np.argmax(scores))


def pruned_argmax(dots: np.ndarray, blocks: TargetBlocks) -> np.ndarray:
    """(N,) flat index of the first maximum score of each keypoint; `dots` is (N, h, w) float64."""
    bounds = block_bounds(dots, blocks)
    w = dots.shape[2]
    best = np.empty(len(dots), dtype=np.int64)
    for k in range(len(dots)):
        bound = bounds[k].ravel()
        top = int(np.argmax(bound))
        score, index = _sample_block(dots[k], blocks, *divmod(top, w))
        candidates = np.flatnonzero(bound >= score)
        if len(candidates) > DENSE_BLOCKS:
            best[k] = _sample_all(dots[k], blocks)
            continue
        order = candidates[np.argsort(-bound[candidates], kind="stable")]
        for block in order:
            if bound[block] < score:
                break
            if block == top:
                continue
            s, i = _sample_block(dots[k], blocks, *divmod(int(block), w))
            if s > score or (s == score and i < index):
                score, index = s, i
        best[k] = index
    return best


def float64_referee_argmax(dots: torch.Tensor, blocks: TargetBlocks) -> np.ndarray:
    """The materialised float64 computation (F.interpolate of the dots, divided by the norms,
    argmax): what `pruned_argmax` must reproduce; for tests and benchmarks."""
    height, width = blocks.norms.shape
    up = F.interpolate(dots.double()[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    scores = up / torch.from_numpy(blocks.norms)
    return scores.reshape(len(dots), -1).argmax(dim=1).numpy()
