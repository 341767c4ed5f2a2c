"""The ``dift`` argmax without the upsampled score map: bound each feature cell, sample only where
the maximum can still be.

The score at target pixel p is  num(p) / |t_p|,  where num is the bilinear upsampling
(align_corners=False) of the low-resolution dot products D = <s, g_ij> and |t_p| the norm of the
upsampled target vector (`taps.upsampled_norms`). Pixels whose taps start at the same grid
cell (i, j) form a rectangular BLOCK; their num is a convex combination of the block's four
corner dots D[i, j], D[i, j+1], D[i+1, j], D[i+1, j+1] (neighbours clamped at the border, as the
taps are), so num <= M = max corner. Hence every score in the block is at most
M / min|t_p| when M >= 0, and at most M / max|t_p| when M < 0.

Two precisions: every D comes first from one float32 matmul (all keypoints of all pairs that
share the target at once), and the bounds use D plus the float32 error bound
(d + 2) 2^-24 |s| |g_ij| (Cauchy-Schwarz on the standard dot-product error bound), so no
rounding can prune the block that holds the maximum. `pruned_argmax` then narrows the blocks in
three vectorised steps (block bounds against a floor; samples of the float32 dots, each within a
known distance of the truth; float64 corners and samples of the few blocks left): the pick is
the float64 referee's (`benchmarks/bench_match.py`: float64 source vectors, dots, taps and
samples), up to the order in which torch's kernel sums four taps. A block whose bound EQUALS
the best is still sampled: it may hold an equal score at an earlier pixel, and the first
maximum in row-major order wins.

When it pays: on maps with a clear maximum most blocks fall at the first step. On flat maps
(random features, or raw features whose massive channels make every cosine ~1, whose per-block
norm dips make the bound loose) most blocks survive it and the float32 streamed argmax of
`kernels` is faster; that is why ``materialise`` is the default and this is opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
    # the pixels of block row i as a padded table (pads repeat the last row and weigh 0; row_ok
    # says which entries are real), and the same for block column j: a batch of blocks is then
    # sampled as one (blocks, rows, columns) array, whatever the blocks' sizes
    row_pix: np.ndarray  # (h, Ph) int64
    row_ok: np.ndarray  # (h, Ph) bool
    a0_pad: np.ndarray  # (h, Ph) float64 (0 at pads)
    a1_pad: np.ndarray
    col_pix: np.ndarray  # (w, Pw) int64
    col_ok: np.ndarray  # (w, Pw) bool
    b0_pad: np.ndarray  # (w, Pw) float64
    b1_pad: np.ndarray


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


def _padded(start: np.ndarray, end: np.ndarray, w0: np.ndarray, w1: np.ndarray):
    """Each segment start[i]:end[i] as a row of a padded table: (pixels, valid, w0, w1)."""
    width = max(1, int((end - start).max()))
    offsets = np.arange(width)
    valid = offsets[None, :] < (end - start)[:, None]
    pixels = np.minimum(start[:, None] + offsets[None, :], np.maximum(end - 1, 0)[:, None])
    pixels = np.minimum(pixels, len(w0) - 1)
    return pixels, valid, np.where(valid, w0[pixels], 0.0), np.where(valid, w1[pixels], 0.0)


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
    # an upper bound of |g_ij| for the float32 error bound (a float32 norm is within 1e-6 of it)
    cell_norms = torch.linalg.vector_norm(grid, dim=-1).double().numpy() * (1 + 1e-6)
    row1, col1 = rows.index1.numpy(), cols.index1.numpy()
    a0, a1 = _one_cell_weights(row0, row1, rows.weight0.numpy(), rows.weight1.numpy())
    b0, b1 = _one_cell_weights(col0, col1, cols.weight0.numpy(), cols.weight1.numpy())
    row_pix, row_ok, a0_pad, a1_pad = _padded(y_start, y_end, a0, a1)
    col_pix, col_ok, b0_pad, b1_pad = _padded(x_start, x_end, b0, b1)
    return TargetBlocks(
        row_pix=row_pix, row_ok=row_ok, a0_pad=a0_pad, a1_pad=a1_pad,
        col_pix=col_pix, col_ok=col_ok, b0_pad=b0_pad, b1_pad=b1_pad,
        norms=norms, row0=row0, row1=row1, a0=a0, a1=a1, col0=col0, col1=col1, b0=b0, b1=b1,
        y_start=y_start, y_end=y_end, x_start=x_start, x_end=x_end,
        cell_row1=np.minimum(cells_h + 1, h - 1), cell_col1=np.minimum(cells_w + 1, w - 1),
        min_norm=lo, max_norm=hi, empty=~np.isfinite(lo), cell_norms=cell_norms, corners=corners,
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


def sample_blocks(corner_dots: np.ndarray, blocks: TargetBlocks, chosen: np.ndarray) -> np.ndarray:
    """Scores of every pixel of each chosen block, (C, Ph, Pw) float64, -inf at the pads.

    `corner_dots` (C, 4) are the dots at each block's corners (`TargetBlocks.corners` order);
    the arithmetic is `sample`'s, term for term: a0 (b0 D00 + b1 D01) + a1 (b0 D10 + b1 D11), over |t_p|."""
    cells_w = blocks.cell_norms.shape[1]
    i, j = np.divmod(chosen, cells_w)
    b0, b1 = blocks.b0_pad[j], blocks.b1_pad[j]  # (C, Pw)
    top = b0 * corner_dots[:, 0, None] + b1 * corner_dots[:, 1, None]
    bottom = b0 * corner_dots[:, 2, None] + b1 * corner_dots[:, 3, None]
    scores = blocks.a0_pad[i][:, :, None] * top[:, None, :] + blocks.a1_pad[i][:, :, None] * bottom[:, None, :]
    scores /= blocks.norms[blocks.row_pix[i][:, :, None], blocks.col_pix[j][:, None, :]]
    scores[~(blocks.row_ok[i][:, :, None] & blocks.col_ok[j][:, None, :])] = -np.inf
    return scores


def _first_pixels(scores: np.ndarray, blocks: TargetBlocks, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each block's best score and the flat image index of its first pixel holding it (rows of
    the padded table run top to bottom and left to right, so the first maximum in the table is
    the first in row-major order)."""
    flat = scores.reshape(len(scores), -1)
    at = np.argmax(flat, axis=1)
    best = flat[np.arange(len(flat)), at]
    i, j = np.divmod(chosen, blocks.cell_norms.shape[1])
    row, col = np.divmod(at, blocks.col_pix.shape[1])
    width = blocks.norms.shape[1]
    return best, blocks.row_pix[i, row] * width + blocks.col_pix[j, col]


#: blocks sampled together: bounds the (blocks, Ph, Pw) float64 scratch arrays (at SPair sizes a
#: block has at most ~19 x 19 pixels: ~6 MB per array)
SAMPLE_CHUNK = 2048


def _sample_best(corner_dots: np.ndarray, blocks: TargetBlocks, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_first_pixels` of `sample_blocks`, a chunk of blocks at a time."""
    best, pixel = np.empty(len(chosen)), np.empty(len(chosen), dtype=np.int64)
    for start in range(0, len(chosen), SAMPLE_CHUNK):
        part = slice(start, start + SAMPLE_CHUNK)
        best[part], pixel[part] = _first_pixels(sample_blocks(corner_dots[part], blocks, chosen[part]), blocks, chosen[part])
    return best, pixel


def _exact_corner_dots(target: torch.Tensor, vectors: torch.Tensor, owners: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """float64 <s_owner, g_cell> for (C, 4) corner cells (a reduction per row, as `exact_dots`)."""
    out = np.empty(cells.shape)
    flat_cells, flat_owners = cells.reshape(-1), np.repeat(owners, cells.shape[1])
    step = 4096  # rows converted to float64 at once (~100 MB at 3072 channels)
    for start in range(0, len(flat_cells), step):
        part = slice(start, start + step)
        rows = target[torch.from_numpy(flat_cells[part])].to(torch.float64)
        out.reshape(-1)[part] = torch.linalg.vecdot(rows, vectors[torch.from_numpy(flat_owners[part])]).numpy()
    return out


def _per_owner_first(owners: np.ndarray, best: np.ndarray, pixel: np.ndarray, n: int) -> np.ndarray:
    """Per owner (keypoint) the smallest pixel among its blocks of the highest score."""
    top = np.full(n, -np.inf)
    np.maximum.at(top, owners, best)
    result = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    winners = best == top[owners]
    np.minimum.at(result, owners[winners], pixel[winners])
    return result


def pruned_argmax(vectors: torch.Tensor, target: torch.Tensor, blocks: TargetBlocks) -> np.ndarray:
    """(N,) flat index of the first maximum score per source vector, all keypoints at once.

    `vectors` (N, D) float64 source vectors; `target` the (h * w, D) float32 target map.

    1. One float32 matmul gives every dot D up to e = (d + 2) 2^-24 |s| |g| (`block_bounds`
       bounds each block from D + e; the best block's pixels, sampled from D - e, give a floor:
       a score some pixel surely reaches). Blocks bounded below the floor are out.
    2. The remaining blocks are sampled from the float32 dots: a block's best sample m is within
       E = max corner e / its smallest |t_p| of its true best, so blocks whose m + E cannot
       reach the highest m - E are out.
    3. The few blocks left (the maximum's, and any too close to call) get float64 dots at their
       corners and float64 samples of every pixel: the pick is the float64 referee's, and the
       first pixel among equal scores wins (ties past the last cell centre are exact here).
    Keypoints whose dots are not finite take the materialised rule (`torch.argmax` of the
    upsampled map), which is what a NaN means there.
    """
    h, w = blocks.cell_norms.shape
    n, d = vectors.shape
    approx32 = vectors.to(torch.float32) @ target.T
    approx = approx32.to(torch.float64).numpy().reshape(n, h, w)
    finite = np.isfinite(approx).reshape(n, -1).all(axis=1)
    # error of a float32 dot of float32-rounded vectors: at most (d + 2) 2^-24 |s| |g| (first order)
    slack = (d + 2) * 2.0**-24 * torch.linalg.vector_norm(vectors, dim=1).numpy()
    error = slack[:, None, None] * blocks.cell_norms
    bounds = block_bounds(approx + error, blocks).reshape(n, -1)
    keys = np.flatnonzero(finite)
    best = np.zeros(n, dtype=np.int64)
    if len(keys):
        corners = blocks.corners
        lower = (approx - error).reshape(n, -1)
        top = np.argmax(bounds[keys], axis=1)
        floor, _ = _sample_best(lower[keys[:, None], corners[top]], blocks, top)
        # step 1: every (keypoint, block) whose bound reaches its keypoint's floor
        rows, chosen = np.nonzero(bounds[keys] >= floor[:, None])
        owners = keys[rows]
        flat = approx.reshape(n, -1)
        cells = corners[chosen]
        estimate, _ = _sample_best(flat[owners[:, None], cells], blocks, chosen)
        # step 2: E per block, plus a margin for the float64 roundings of the samples
        corner_error = (slack[owners, None] * blocks.cell_norms.reshape(-1)[cells]).max(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = corner_error / blocks.min_norm.reshape(-1)[chosen]
            spread += BOUND_MARGIN * np.abs(flat[owners[:, None], cells]).max(axis=1) / blocks.min_norm.reshape(-1)[chosen]
        surely = np.full(n, -np.inf)
        np.maximum.at(surely, owners, estimate - spread)
        close = estimate + spread >= surely[owners]
        owners, chosen, cells = owners[close], chosen[close], cells[close]
        # step 3: float64 at the corners of the blocks left, every pixel sampled
        exact = _exact_corner_dots(target, vectors, owners, cells)
        scores, pixels = _sample_best(exact, blocks, chosen)
        best[keys] = _per_owner_first(owners, scores, pixels, n)[keys]
    if not finite.all():
        others = np.flatnonzero(~finite)
        height, width = blocks.norms.shape
        up = F.interpolate(approx32[others].reshape(len(others), 1, h, w), size=(height, width), mode="bilinear",
                           align_corners=False).reshape(len(others), -1)
        best[others] = torch.argmax(up / torch.from_numpy(blocks.norms).reshape(1, -1).float(), dim=1).numpy()
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
