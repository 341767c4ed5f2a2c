"""Compiled CPU loops of the ``dift`` matcher: the float32 argmax without the upsampled score map
(`upsampled_argmax`), and the Gram entries of neighbouring cells behind |t_p| (`neighbour_grams`).

What `upsampled_argmax` computes is `DiftMatcher`'s materialised rule, score for score: the low-resolution dot
map D (h, w) of one keypoint is upsampled bilinearly (align_corners=False) to the target's
(H, W) pixels, each pixel is scaled by 1 / |t_p|, and the first maximum in row-major order is
the pick (a NaN counts as the maximum, as in ``torch.argmax``). Every pixel is evaluated in
float32 exactly as PyTorch's CPU kernel does, fused multiply-adds included (GCC contracts its
``t0 * w0 + t1 * w1``): column sums C[r] = fma(D[r, c0], b0, D[r, c1] * b1), then
fma(C[r0], a0, C[r1] * a1), times 1 / |t_p|. Same bits, so the same pick, near ties included
(without the fused steps ~30 % of pixels differed in the last bit, and 17 of 3,986 SPair-like
keypoints tied within 1e-5 went the other way). The column sums are shared by all rows that read the
same grid row, so they are made once per keypoint (h x W values).

Why a compiled kernel: torch's upsampling kernel writes the whole map (10 keypoints at
500 x 375 is 7.5 MB), and the scale and argmax read it twice more: ~3.4 ms per SPair pair on
one core, most of a pair's time. Here each pixel row lives in the core's first-level cache:
it is computed, checked against the running maximum in the same vectorised loop, and only a
row that holds a new maximum is scanned again for its first position. Measured on the 2-core
VM (2026-12-07): ~0.05 ms per keypoint at 500 x 375 against ~0.34 ms for upsample + scale +
argmax through torch and numpy.

numba (a ditf dependency) compiles the kernel on first use and caches it on disk. Where numba
is missing (the GPU image, which matches on the device anyway), `available()` is False and
`DiftMatcher` keeps torch's kernel.

`neighbour_grams`: the five dot-product maps of neighbouring cells (`taps.upsampled_norms`) in
one pass over the map, summed in float64 in vector lanes (torch's five float32 ``vecdot`` calls
each read the map again).
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency; the GPU image lacks it and matches on CUDA with torch
    import numba
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

if numba is not None:
    @_intrinsic
    def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
        """fma(a, b, c) = a * b + c rounded once, in float32: LLVM's ``llvm.fma`` (one vfmadd
        instruction where the CPU has FMA). numba has no fma of its own, and letting LLVM
        contract (``fastmath``) would leave which product is fused to the optimiser."""
        signature = _types.float32(_types.float32, _types.float32, _types.float32)

        def codegen(context, builder, sig, args):
            return builder.fma(*args)
        return signature, codegen
else:  # pragma: no cover - only where numba is absent
    _fma = None


def available() -> bool:
    """Whether the compiled kernel can run here (numba importable)."""
    return numba is not None


def _compiled(function, **options):
    """`function` compiled by numba (cached on disk, without the GIL or bounds checks), or None
    where numba is missing (callers check `available` first)."""
    if numba is None:  # pragma: no cover - only where numba is absent
        return None
    return numba.njit(cache=True, nogil=True, boundscheck=False, **options)(function)


def _scan_row(row, offset, best, at):  # pragma: no cover - compiled (inlined by numba)
    """Scan one computed pixel row in order: (best, at, found_nan). Strictly greater keeps the
    first of equal maxima; a NaN is the maximum (``torch.argmax``) and ends the search."""
    for x in range(len(row)):
        value = row[x]
        if value != value:
            return best, offset + x, True
        if value > best:
            best, at = value, offset + x
    return best, at, False


def _upsampled_argmax(dots, row0, row1, a0, a1, col0, col1, b0, b1, inverse_norm, out):  # pragma: no cover - compiled
    """For each keypoint k: the flat index of the first maximum of upsample(dots[k]) * inverse_norm,
    with the arithmetic of torch's generic kernel (maps of more than 128 pixels in height + width)."""
    keypoints, cells_h, _ = dots.shape
    height, width = inverse_norm.shape
    columns = np.empty((cells_h, width), dtype=np.float32)
    row = np.empty(width, dtype=np.float32)
    for k in range(keypoints):
        grid = dots[k]
        for r in range(cells_h):
            for x in range(width):
                columns[r, x] = _fma(grid[r, col0[x]], b0[x], grid[r, col1[x]] * b1[x])
        best = np.float32(-np.inf)
        at = -1
        for y in range(height):
            top, bottom, weight0, weight1, scale = columns[row0[y]], columns[row1[y]], a0[y], a1[y], inverse_norm[y]
            # one vectorised pass: compute the row and note whether anything beats the best so far
            # (an OR of comparisons vectorises; a running max with NaN rules does not); only a
            # row that does is scanned again for its first position
            hit = False
            for x in range(width):
                value = _fma(top[x], weight0, bottom[x] * weight1) * scale[x]
                row[x] = value
                hit |= (value > best) | (value != value)
            if hit:
                best, at, found_nan = _scan_row(row, y * width, best, at)
                if found_nan:
                    break
        out[k] = at
    return out


def _small_upsampled_argmax(dots, row0, row1, a0, a1, col0, col1, b0, b1, inverse_norm, out):  # pragma: no cover - compiled
    """`_upsampled_argmax` with the arithmetic of torch's kernel for small maps (height + width
    at most 128, its vectorised channels-last kernel): four corner weights a_i b_j, each rounded,
    summed as fma(D11, w11, fma(D10, w10, fma(D00, w00, D01 w01)))."""
    keypoints = dots.shape[0]
    height, width = inverse_norm.shape
    row = np.empty(width, dtype=np.float32)
    for k in range(keypoints):
        grid = dots[k]
        best = np.float32(-np.inf)
        at = -1
        for y in range(height):
            r0, r1 = row0[y], row1[y]
            for x in range(width):
                c0, c1 = col0[x], col1[x]
                value = _fma(grid[r0, c0], a0[y] * b0[x], grid[r0, c1] * (a0[y] * b1[x]))
                value = _fma(grid[r1, c0], a1[y] * b0[x], value)
                row[x] = _fma(grid[r1, c1], a1[y] * b1[x], value) * inverse_norm[y, x]
            best, at, found_nan = _scan_row(row, y * width, best, at)
            if found_nan:
                break
        out[k] = at
    return out


_scan_row = _compiled(_scan_row)
_kernel = _compiled(_upsampled_argmax)
_small_kernel = _compiled(_small_upsampled_argmax)

#: torch picks its vectorised kernel for outputs of at most this many pixels in height + width
#: (``_use_vectorized_kernel_cond_2d`` in ATen's UpSampleKernel.cpp), its generic one above
SMALL_OUTPUT = 128


def upsampled_argmax(dots: np.ndarray, rows, cols, inverse_norm: np.ndarray) -> np.ndarray:
    """(K,) first-maximum flat pixel of each (h, w) float32 dot map upsampled to `inverse_norm`'s
    (H, W) and scaled by it. `rows` / `cols` are the float32 `taps.LinearTaps` of the two axes (torch
    or numpy arrays)."""
    dots = np.ascontiguousarray(dots, dtype=np.float32)
    out = np.empty(len(dots), dtype=np.int64)
    if len(dots) == 0:
        return out
    taps = [np.ascontiguousarray(np.asarray(t)) for t in (rows.index0, rows.index1, rows.weight0, rows.weight1,
                                                          cols.index0, cols.index1, cols.weight0, cols.weight1)]
    kernel = _small_kernel if sum(inverse_norm.shape) <= SMALL_OUTPUT else _kernel
    return kernel(dots, *taps, np.ascontiguousarray(inverse_norm, dtype=np.float32), out)


def _neighbour_grams(grid, self_dot, right, down, diagonal, anti_diagonal):  # pragma: no cover - compiled
    """<g[i,j], g[i,j]>, <g[i,j], g[i,j+1]>, <g[i,j], g[i+1,j]>, <g[i,j], g[i+1,j+1]> and
    <g[i,j+1], g[i+1,j]> of an (h, w, D) float32 map, each a sum over D in float64:
    |t_p| then sits closer to the float64 referee's than torch's float32 sums do."""
    h, w, d = grid.shape
    for i in range(h):
        for j in range(w):
            a = grid[i, j]
            total = 0.0
            for c in range(d):
                total += np.float64(a[c]) * a[c]
            self_dot[i, j] = total
            if j + 1 < w:
                b = grid[i, j + 1]
                total = 0.0
                for c in range(d):
                    total += np.float64(a[c]) * b[c]
                right[i, j] = total
            if i + 1 < h:
                b = grid[i + 1, j]
                total = 0.0
                for c in range(d):
                    total += np.float64(a[c]) * b[c]
                down[i, j] = total
                if j + 1 < w:
                    b = grid[i + 1, j + 1]
                    total = 0.0
                    for c in range(d):
                        total += np.float64(a[c]) * b[c]
                    diagonal[i, j] = total
                    a2, b = grid[i, j + 1], grid[i + 1, j]
                    total = 0.0
                    for c in range(d):
                        total += np.float64(a2[c]) * b[c]
                    anti_diagonal[i, j] = total


# reassociation lets the sums run in vector lanes (partial sums, then added): the order of
# the float64 sum changes, not its accuracy
_grams_kernel = _compiled(_neighbour_grams, fastmath={"reassoc"})


def neighbour_grams(grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """(self, right, down, diagonal, anti-diagonal) float64 Gram maps of an (h, w, D) float32 map, shaped
    (h, w), (h, w-1), (h-1, w), (h-1, w-1), (h-1, w-1); h and w at least 2."""
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    h, w, _ = grid.shape
    out = (np.empty((h, w)), np.empty((h, w - 1)), np.empty((h - 1, w)), np.empty((h - 1, w - 1)), np.empty((h - 1, w - 1)))
    _grams_kernel(grid, *out)
    return out


def _bilinear_rows(cells, a0, a1, b0, b1, out):  # pragma: no cover - compiled
    """out[n] = a0 (b0 c00 + b1 c01) + a1 (b0 c10 + b1 c11) per keypoint n, where cells holds the
    four (N, D) blocks c00, c01, c10, c11 one after the other: F.interpolate's order of operations."""
    n, d = out.shape
    for k in range(n):
        row0, row1, col0, col1 = a0[k], a1[k], b0[k], b1[k]
        for c in range(d):
            out[k, c] = row0 * (col0 * cells[k, c] + col1 * cells[n + k, c]) + row1 * (
                col0 * cells[2 * n + k, c] + col1 * cells[3 * n + k, c])
    return out


_rows_kernel = _compiled(_bilinear_rows)


def bilinear_rows(cells: np.ndarray, a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """(N, D) upsampled vectors from the (4N, D) corner rows [c00; c01; c10; c11] and the (N,)
    row weights a0, a1 and column weights b0, b1 (all of one float dtype)."""
    out = np.empty((len(a0), cells.shape[1]), dtype=cells.dtype)
    return _rows_kernel(cells, a0, a1, b0, b1, out)


def _mixed_rows(row_quad, cross, rows, a0, a1, out):  # pragma: no cover - compiled
    """out[y] = sqrt(max(0, a0^2 P[r] + a1^2 P[r+1] + 2 a0 a1 Q[r])) with r = rows[y], in torch's
    order of operations (`taps.upsampled_norms`, which did this in eight whole-map passes)."""
    height, width = out.shape
    for y in range(height):
        r = rows[y]
        first, second, both = a0[y] ** 2, a1[y] ** 2, 2 * a0[y] * a1[y]
        for x in range(width):
            value = first * row_quad[r, x] + second * row_quad[r + 1, x] + both * cross[r, x]
            out[y, x] = np.sqrt(value) if value > 0 else 0.0
    return out


_mix_kernel = _compiled(_mixed_rows)


def mixed_rows(row_quad: np.ndarray, cross: np.ndarray, rows: np.ndarray, a0: np.ndarray, a1: np.ndarray) -> np.ndarray:
    """|t_p| (H, W) from the per-grid-row quadratic forms P (h, W) and Q (h-1, W) and the row taps."""
    out = np.empty((len(rows), row_quad.shape[1]), dtype=row_quad.dtype)
    return _mix_kernel(row_quad, cross, rows, a0, a1, out)


def warm_up() -> None:
    """Load (or compile, on a first run) every kernel for the dtypes the matcher uses, on tiny
    inputs: ~0.4 s from numba's disk cache, which a worker process pays while it boots."""
    if not available():
        return
    from types import SimpleNamespace

    # the float32 taps of 2 cells shown at 3 pixels, as `taps.linear_taps` gives them (numpy here:
    # this module knows nothing of torch)
    taps = SimpleNamespace(index0=np.array([0, 0, 1]), index1=np.array([1, 1, 1]),
                           weight0=np.array([1, 0.5, 1], np.float32), weight1=np.array([0, 0.5, 0], np.float32))
    upsampled_argmax(np.zeros((1, 2, 2), np.float32), taps, taps, np.ones((3, 3), np.float32))
    wide = SimpleNamespace(**{name: np.resize(value, SMALL_OUTPUT) for name, value in vars(taps).items()})
    upsampled_argmax(np.zeros((1, 2, 2), np.float32), taps, wide, np.ones((3, SMALL_OUTPUT), np.float32))
    neighbour_grams(np.zeros((2, 2, 4), np.float32))
    mixed_rows(np.zeros((2, 3), np.float32), np.zeros((1, 3), np.float32), np.zeros(3, np.int64),
               np.ones(3, np.float32), np.zeros(3, np.float32))
    mixed_rows(np.zeros((2, 3)), np.zeros((1, 3)), np.zeros(3, np.int64), np.ones(3), np.zeros(3))
    for dtype in (np.float32, np.float64):
        weights = np.ones(1, dtype)
        bilinear_rows(np.zeros((4, 4), dtype), weights, weights, weights, weights)
