"""The ``dift`` argmax without the upsampled score map: bound each feature cell, sample only where
the maximum can still be.

The score at target pixel p is  num(p) / |t_p|,  where num is the bilinear upsampling
(align_corners=False) of the low-resolution dot products D = <s, g_ij> and |t_p| the norm of the
upsampled target vector (`taps.upsampled_norms`). Pixels whose taps start at the same grid
cell (i, j) form a rectangular BLOCK; their num is a convex combination of the block's four
corner dots D[i, j], D[i, j+1], D[i+1, j], D[i+1, j+1] (neighbours clamped at the border, as the
taps are), so num <= M = max corner. Hence every score in the block is at most
M / min|t_p| when M >= 0, and at most M / max|t_p| when M < 0.

Two precisions: every D comes first from one float32 matmul, and the bound uses D plus the
float32 error bound (d + 2) 2^-24 |s| |g_ij| (Cauchy-Schwarz on the standard dot-product error
bound), so no rounding can prune the block that holds the maximum. The best block's corners are
then recomputed in float64, sampled exactly, and every block whose bound reaches that score has
its corners recomputed in float64 and all its pixels sampled: the pick is the float64 referee's
(`benchmarks/bench_match.py`: float64 source vectors, dots, taps and samples), up to the order
in which torch's kernel sums four taps. A block whose bound EQUALS the best is still sampled:
it may hold an equal score at an earlier pixel, and the first maximum in row-major order wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: beyond this many candidate blocks for one keypoint every pixel is sampled in one pass
DENSE_BLOCKS = 256

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
    cell_norms: np.ndarray  # (h, w) float64 |g_ij| (for the float32 error bound)
    corners: np.ndarray  # (h * w, 4) int64 flat cells a block reads
    block_pixels: np.ndarray  # (H * W,) int32 flat pixels, grouped by block in row-major block order
    block_offsets: np.ndarray  # (h * w + 1,) int64 block b owns block_pixels[off[b]:off[b + 1]]


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


def _one_cell_weights(index0, index1, weight0, weight1) -> tuple[np.ndarray, np.ndarray]:
    """Weights (1, 0) where both taps read the same cell (past the last cell centre, or equal sizes).

    The same value either way in exact arithmetic, but w0 x + w1 x rounds differently for each
    pixel past the border, which would break the exact tie that the first-maximum rule resolves
    there (every such pixel has the same score)."""
    same = index0 == index1
    return np.where(same, 1.0, weight0), np.where(same, 0.0, weight1)


def target_blocks(grid: torch.Tensor, size: tuple[int, int]) -> TargetBlocks:
    """`TargetBlocks` of a (h, w, D) float32 target map shown at `size` = (width, height)."""
    from .taps import linear_taps, upsampled_norms

    width, height = size
    h, w, _ = grid.shape
    rows = linear_taps(h, height, "cpu", torch.float64)
    cols = linear_taps(w, width, "cpu", torch.float64)
    norms = upsampled_norms(grid, size, torch.float64).clamp_min(1e-300).numpy()
    row0, col0 = rows.index0.numpy(), cols.index0.numpy()
    y_start, y_end = _segments(row0, h)
    x_start, x_end = _segments(col0, w)
    lo, hi = _block_extremes(norms, y_start, y_end, x_start, x_end)
    cells_h, cells_w = np.arange(h), np.arange(w)
    i1, j1 = np.minimum(cells_h + 1, h - 1), np.minimum(cells_w + 1, w - 1)
    corners = np.stack([np.add.outer(cells_h * w, cells_w), np.add.outer(cells_h * w, j1),
                        np.add.outer(i1 * w, cells_w), np.add.outer(i1 * w, j1)], axis=-1).reshape(h * w, 4)
    owner = np.add.outer(row0 * w, col0).ravel()
    # an upper bound of |g_ij| for the float32 error bound (a float32 norm is within 1e-6 of it)
    cell_norms = torch.linalg.vector_norm(grid, dim=-1).double().numpy() * (1 + 1e-6)
    row1, col1 = rows.index1.numpy(), cols.index1.numpy()
    a0, a1 = _one_cell_weights(row0, row1, rows.weight0.numpy(), rows.weight1.numpy())
    b0, b1 = _one_cell_weights(col0, col1, cols.weight0.numpy(), cols.weight1.numpy())
    return TargetBlocks(
        norms=norms, row0=row0, row1=row1, a0=a0, a1=a1, col0=col0, col1=col1, b0=b0, b1=b1,
        y_start=y_start, y_end=y_end, x_start=x_start, x_end=x_end,
        cell_row1=np.minimum(cells_h + 1, h - 1), cell_col1=np.minimum(cells_w + 1, w - 1),
        min_norm=lo, max_norm=hi, empty=~np.isfinite(lo), cell_norms=cell_norms, corners=corners,
        block_pixels=np.argsort(owner, kind="stable").astype(np.int32),
        block_offsets=np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=h * w))]),
    )


def block_bounds(upper: np.ndarray, blocks: TargetBlocks) -> np.ndarray:
    """(N, h, w) upper bound of the score in each block, from upper bounds of the dots (-inf when
    a block is empty); the margin covers the float64 roundings of a sample."""
    r1, c1 = blocks.cell_row1, blocks.cell_col1
    down = np.maximum(upper, upper[:, r1])
    corner_max = np.maximum(down, down[:, :, c1])
    up = np.minimum(upper, upper[:, r1])
    corner_min = np.minimum(up, up[:, :, c1])
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = np.where(corner_max >= 0, corner_max / blocks.min_norm, corner_max / blocks.max_norm)
        magnitude = np.maximum(np.abs(corner_max), np.abs(corner_min)) / blocks.min_norm
    bound = bound + BOUND_MARGIN * magnitude
    bound[:, blocks.empty] = -np.inf
    return bound


def exact_dots(target: torch.Tensor, cells: np.ndarray, vector: torch.Tensor) -> np.ndarray:
    """float64 <s, g> at the given flat cells of a (h * w, D) float32 target (a reduction per
    row, not a matrix product: a cell's value does not depend on which other cells are asked for)."""
    rows = target[torch.from_numpy(cells)].to(torch.float64)
    return torch.linalg.vecdot(rows, vector).numpy()


def sample(dots: np.ndarray, blocks: TargetBlocks, pixels: np.ndarray) -> tuple[float, int]:
    """Best float64 score among flat `pixels` and the first (smallest) pixel holding it.

    `dots` is the flat (h * w,) dot map; the sample is a0 (b0 D00 + b1 D01) + a1 (b0 D10 + b1 D11)
    over |t_p|, elementwise, so its value does not depend on which pixels are sampled together."""
    width = len(blocks.b0)
    cells_w = len(blocks.cell_col1)
    y, x = np.divmod(pixels, width)
    r0, r1 = blocks.row0[y] * cells_w, blocks.row1[y] * cells_w
    c0, c1 = blocks.col0[x], blocks.col1[x]
    b0, b1 = blocks.b0[x], blocks.b1[x]
    top = b0 * dots[r0 + c0] + b1 * dots[r0 + c1]
    bottom = b0 * dots[r1 + c0] + b1 * dots[r1 + c1]
    scores = (blocks.a0[y] * top + blocks.a1[y] * bottom) / blocks.norms.ravel()[pixels]
    best = scores.max()
    return float(best), int(pixels[scores == best].min())


def _pixels_of(blocks: TargetBlocks, chosen: np.ndarray) -> np.ndarray:
    offsets = blocks.block_offsets
    return np.concatenate([blocks.block_pixels[offsets[b]:offsets[b + 1]] for b in chosen])


def pruned_argmax(vectors: torch.Tensor, target: torch.Tensor, blocks: TargetBlocks) -> np.ndarray:
    """(N,) flat index of the first maximum score per source vector.

    `vectors` (N, D) float64 source vectors; `target` the (h * w, D) float32 target map."""
    h, w = blocks.cell_norms.shape
    n, d = vectors.shape
    approx = (vectors.to(torch.float32) @ target.T).to(torch.float64).numpy().reshape(n, h, w)
    # error of a float32 dot of float32-rounded vectors: at most (d + 2) 2^-24 |s| |g| (first order)
    slack = (d + 2) * 2.0**-24 * torch.linalg.vector_norm(vectors, dim=1).numpy()
    error = slack[:, None, None] * blocks.cell_norms
    bounds = block_bounds(approx + error, blocks)
    below = (approx - error).reshape(n, -1)  # lower bounds of the dots: samples of them bound scores from below
    everything = np.arange(blocks.norms.size)
    best = np.empty(n, dtype=np.int64)
    for k in range(n):
        bound = bounds[k].ravel()
        top = int(np.argmax(bound))
        floor, _ = sample(below[k], blocks, _pixels_of(blocks, [top]))  # <= the best score
        candidates = np.flatnonzero(bound >= floor)
        cells = np.unique(blocks.corners[candidates])
        dots = approx[k].ravel().copy()
        dots[cells] = exact_dots(target, cells, vectors[k])
        # blocks left out keep float32 dots: their samples stay below their bound, below the best
        pixels = everything if len(candidates) > DENSE_BLOCKS else _pixels_of(blocks, candidates)
        best[k] = sample(dots, blocks, pixels)[1]
    return best


def exhaustive_argmax(vectors: torch.Tensor, target: torch.Tensor, blocks: TargetBlocks) -> np.ndarray:
    """Every dot in float64 and every pixel sampled: what `pruned_argmax` must equal (tests)."""
    cells = np.arange(target.shape[0])
    everything = np.arange(blocks.norms.size)
    return np.array([sample(exact_dots(target, cells, v), blocks, everything)[1] for v in vectors], dtype=np.int64)


def float64_referee_argmax(dots: torch.Tensor, blocks: TargetBlocks) -> np.ndarray:
    """The materialised float64 computation (F.interpolate of (N, h, w) float64 dots, divided by
    the norms, argmax): the benchmark referee's rule, for tests."""
    height, width = blocks.norms.shape
    up = F.interpolate(dots.double()[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    scores = up / torch.from_numpy(blocks.norms)
    return scores.reshape(len(dots), -1).argmax(dim=1).numpy()
