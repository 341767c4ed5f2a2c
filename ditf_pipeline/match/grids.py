"""Checks of what every matcher is handed: (h, w, D) feature grids, image sizes, source keypoints.

Why a module of its own: both protocols (`dift`, `geoaware`) and the benchmarks check their
inputs the same way, and an input error must read the same whichever matcher saw it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.errors import DitfError

#: (width, height) of an original image, as in `datasets.base.Pair`
ImageSize = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def as_float_grid(feature: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """A (h, w, D) float32 contiguous tensor on the feature's own device (accepts float16 caches
    and numpy arrays)."""
    grid = torch.as_tensor(feature)
    if grid.ndim != 3:
        raise DitfError(f"{what} feature map must be (h, w, D), got shape {tuple(grid.shape)}")
    return grid.to(torch.float32).contiguous()


def check_grid(feature: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """A (h, w, D) tensor in its cached dtype (float16 stays float16: only what is read is converted)."""
    grid = torch.as_tensor(feature)
    if grid.ndim != 3:
        raise DitfError(f"{what} feature map must be (h, w, D), got shape {tuple(grid.shape)}")
    return grid


def check_size(size: ImageSize, what: str) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise DitfError(f"{what} image size must be positive (width, height), got {tuple(size)}")
    return width, height


def integer_keypoints(keypoints: np.ndarray, size: ImageSize) -> tuple[np.ndarray, np.ndarray]:
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

