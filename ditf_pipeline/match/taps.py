"""Bilinear taps of PyTorch's upsampling, and upsampled vectors and norms computed from them.

Why a module of its own: the `dift` matcher (`dift.py`) and the pruned argmax (`pruned.py`)
both read the upsampled map through these taps without building it, and must agree with
``F.interpolate(..., mode="bilinear", align_corners=False)`` bit for bit in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LinearTaps", "linear_taps", "upsampled_norms", "upsampled_vectors"]

#: (width, height) in pixels
ImageSize = tuple[int, int]

@dataclass(frozen=True)
class LinearTaps:
    """1-D bilinear taps of ``F.interpolate(..., mode="bilinear", align_corners=False)``.

    Output index i reads ``weight0[i] * x[index0[i]] + weight1[i] * x[index1[i]]``.
    """

    index0: torch.Tensor  # (out,) int64
    index1: torch.Tensor  # (out,) int64, index0 + 1 except at the last input cell
    weight0: torch.Tensor  # (out,) float32
    weight1: torch.Tensor  # (out,) float32


def linear_taps(in_size: int, out_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LinearTaps:
    """Taps exactly as PyTorch's CPU kernel computes them, in float32 (cached per sizes and device:
    SPair has a handful of image sizes, and building taps per pair cost ~0.7 ms of its ~7).

    `dtype=torch.float64` gives the taps of the same grid computed in float64 (what
    ``F.interpolate`` uses on float64 input): the benchmark's float64 referee.
    """
    return _linear_taps(int(in_size), int(out_size), str(torch.device(device)), dtype)


@functools.lru_cache(maxsize=1024)
def _linear_taps(in_size: int, out_size: int, device: str, dtype: torch.dtype) -> LinearTaps:
    """`linear_taps`, uncached.

    scale = in/out (float32); real = max(fma(scale, i + 0.5, -0.5), 0); index0 = min(floor(real), in - 1);
    weight1 = clamp(real - index0, 0, 1); index1 = index0 + (index0 < in - 1).
    """
    dst = torch.arange(out_size, dtype=torch.float64, device=device)
    if in_size == out_size:  # PyTorch copies in this case
        index0 = torch.arange(out_size, device=device)
        return LinearTaps(index0, index0, torch.ones(out_size, device=device, dtype=dtype),
                          torch.zeros(out_size, device=device, dtype=dtype))
    if dtype == torch.float64:
        real = (in_size / out_size * (dst + 0.5) - 0.5).clamp_min(0)
    else:
        scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
        # PyTorch's kernel evaluates scale * (i + 0.5) - 0.5 as one fused multiply-add (a single
        # rounding to float32); in float64 the product and difference are exact, so rounding once
        # at the end reproduces its weights bit for bit.
        real = (scale.double().to(device) * (dst + 0.5) - 0.5).to(torch.float32).clamp_min(0)
    index0 = real.floor().to(torch.int64).clamp_max(in_size - 1)
    weight1 = (real - index0.to(real.dtype)).clamp(0, 1)
    index1 = index0 + (index0 < in_size - 1).to(torch.int64)
    return LinearTaps(index0, index1, 1 - weight1, weight1)


def _taps_dtype(grid: torch.Tensor) -> torch.dtype:
    """float64 maps get float64 taps (the referee); every other map float32 (the fast path)."""
    return torch.float64 if grid.dtype == torch.float64 else torch.float32


def upsampled_vectors(grid: torch.Tensor, size: ImageSize, xs: np.ndarray, ys: np.ndarray,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of the bilinearly upsampled map at integer pixels (ys, xs): (N, D), 4 taps each.

    `dtype` (default: float64 for float64 maps, else float32) is the arithmetic: float64 on a
    float16 map gives the referee's vectors without converting the whole map."""
    width, height = size
    h, w, _ = grid.shape
    dtype = dtype or _taps_dtype(grid)
    rows, cols = linear_taps(h, height, grid.device, dtype), linear_taps(w, width, grid.device, dtype)
    if grid.device.type == "cpu":
        from . import kernels

        if kernels.available():  # a dozen small torch ops cost ~0.25 ms per pair; one compiled loop ~0.05
            ri0, ri1, c0, c1 = rows.index0.numpy()[ys], rows.index1.numpy()[ys], cols.index0.numpy()[xs], cols.index1.numpy()[xs]
            flat = torch.from_numpy(np.concatenate([ri0 * w + c0, ri0 * w + c1, ri1 * w + c0, ri1 * w + c1]))
            cells = grid.reshape(h * w, -1)[flat].to(dtype).numpy()
            return torch.from_numpy(kernels.bilinear_rows(cells, rows.weight0.numpy()[ys], rows.weight1.numpy()[ys],
                                                          cols.weight0.numpy()[xs], cols.weight1.numpy()[xs]))
    ys, xs = torch.as_tensor(np.stack([ys, xs]), device=grid.device)  # one host -> device copy for both
    r0, r1, a0, a1 = rows.index0[ys], rows.index1[ys], rows.weight0[ys, None], rows.weight1[ys, None]
    c0, c1, b0, b1 = cols.index0[xs], cols.index1[xs], cols.weight0[xs, None], cols.weight1[xs, None]
    # the four cells of every keypoint in one gather, and only those converted (float16 caches)
    flat = torch.cat([r0 * w + c0, r0 * w + c1, r1 * w + c0, r1 * w + c1])
    c00, c01, c10, c11 = grid.reshape(h * w, -1)[flat].to(dtype).chunk(4)
    return a0 * (b0 * c00 + b1 * c01) + a1 * (b0 * c10 + b1 * c11)


def _neighbour_taps(taps: LinearTaps, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrite taps as ``w0 * x[i] + w1 * x[i + 1]`` with i + 1 always a real neighbour.

    PyTorch clamps the neighbour of the last cell onto itself (index1 == index0 == in - 1);
    that is the same vector as weight 0 on cell in - 2 and w0 + w1 on cell in - 1. Sizes of 1
    keep their taps (the caller repeats the single cell).
    """
    if in_size == 1:
        return taps.index0, taps.weight0, taps.weight1
    at_end = taps.index0 == in_size - 1
    index = torch.where(at_end, in_size - 2, taps.index0)
    weight0 = torch.where(at_end, torch.zeros_like(taps.weight0), taps.weight0)
    weight1 = torch.where(at_end, taps.weight0 + taps.weight1, taps.weight1)
    return index, weight0, weight1


def _neighbour_grams(grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The five Gram maps of `upsampled_norms`: one compiled pass over a float32 CPU map
    (`kernels.neighbour_grams`), else torch's ``vecdot`` per map (other dtypes and devices)."""
    from . import kernels

    if grid.device.type == "cpu" and grid.dtype == torch.float32 and kernels.available():
        return tuple(torch.from_numpy(m) for m in kernels.neighbour_grams(grid.numpy()))
    top, bottom = grid[:-1], grid[1:]
    return (torch.linalg.vecdot(grid, grid),  # (h, w)
            torch.linalg.vecdot(grid[:, :-1], grid[:, 1:]),  # (h, w-1)
            torch.linalg.vecdot(top, bottom),  # (h-1, w)
            torch.linalg.vecdot(top[:, :-1], bottom[:, 1:]),  # (h-1, w-1)  <g[r,c], g[r+1,c+1]>
            torch.linalg.vecdot(top[:, 1:], bottom[:, :-1]))  # (h-1, w-1)  <g[r,c+1], g[r+1,c]>


def upsampled_norms(grid: torch.Tensor, size: ImageSize, dtype: torch.dtype | None = None) -> torch.Tensor:
    """|t_p| of the bilinearly upsampled map at every pixel, (H, W), without building the map.

    With t_p = sum_ij a_i b_j g[r + i, c + j] (i, j in {0, 1}; `_neighbour_taps`),
    |t_p|^2 = a0^2 P[r] + a1^2 P[r+1] + 2 a0 a1 Q[r], where per grid row r and output column x
    P[r] = b0^2 |g[r,c]|^2 + b1^2 |g[r,c+1]|^2 + 2 b0 b1 <g[r,c], g[r,c+1]>  and
    Q[r] = b0^2 <g[r,c], g[r+1,c]> + b1^2 <g[r,c+1], g[r+1,c+1]>
           + b0 b1 (<g[r,c], g[r+1,c+1]> + <g[r,c+1], g[r+1,c]>):
    five Gram maps of neighbouring cells (self, right, down, diagonal, anti-diagonal).

    The Gram maps are summed in the map's dtype; `dtype` (default as `upsampled_vectors`) is the
    arithmetic of the taps and quadratic forms: float64 on a float32 map costs no float64 copy
    of the map (the sums of squares do not cancel, so float32 sums keep ~1e-7 relative accuracy).
    """
    width, height = size
    h, w, _ = grid.shape
    dtype = dtype or _taps_dtype(grid)
    r, a0, a1 = _neighbour_taps(linear_taps(h, height, grid.device, dtype), h)
    c, b0, b1 = _neighbour_taps(linear_taps(w, width, grid.device, dtype), w)
    if h == 1:
        grid = grid.expand(2, -1, -1)
    if w == 1:
        grid = grid.expand(-1, 2, -1)
    self_dot, right, down, diagonal, anti_diagonal = (m.to(dtype) for m in _neighbour_grams(grid))

    row_quad = b0**2 * self_dot[:, c] + b1**2 * self_dot[:, c + 1] + 2 * b0 * b1 * right[:, c]  # (h, W)
    cross = b0**2 * down[:, c] + b1**2 * down[:, c + 1] + b0 * b1 * (diagonal[:, c] + anti_diagonal[:, c])  # (h-1, W)
    if grid.device.type == "cpu":
        from . import kernels

        if kernels.available():  # the same arithmetic, one pass over the (H, W) map instead of eight
            return torch.from_numpy(kernels.mixed_rows(row_quad.contiguous().numpy(), cross.contiguous().numpy(),
                                                       r.numpy(), a0.numpy(), a1.numpy()))
    a0, a1 = a0[:, None], a1[:, None]
    squared = a0**2 * row_quad[r] + a1**2 * row_quad[r + 1] + 2 * a0 * a1 * cross[r]
    return squared.clamp_min(0).sqrt()
