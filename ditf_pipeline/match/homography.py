"""HPatches homography estimation and scoring, as DIFT's ``eval_hpatches.py`` +
``eval_homography.py`` (Tsingularity/dift) do it. numpy + OpenCV only (no torch).

Descriptors (``eval_hpatches.py``): keypoints (x, y) in ORIGINAL image pixels are normalised
with ``c = ((W - 1) / 2, (H - 1) / 2)``, ``g = (p - c) / c`` (so pixel 0 -> -1 and pixel W-1 ->
+1), and the (rows, cols, D) feature map is sampled by ``F.grid_sample`` with its defaults:
bilinear, zero padding, ``align_corners=False``. Under align_corners=False, g = -1 is the
LEFT EDGE of the feature map, i.e. feature-cell coordinate ``u = (g + 1) * cols / 2 - 0.5``.
`sample_descriptors` reproduces that in numpy (checked against torch in the tests).

Matching (``eval_homography.py``): keypoints of each image are de-duplicated and sorted with
``np.unique(axis=0)``; cosine mutual nearest neighbours (L2-normalised descriptors, argmax
both ways, keep i with nn21[nn12[i]] == i); ``cv2.findHomography(pts_1, pts_k, cv2.LMEDS,
ransacReprojThreshold=3)`` (DIFT's default mode "lmeds"; "ransac" is its alternative; the
threshold only matters for RANSAC). On a GPU (`match_pair(..., device="cuda")`) the sampling is
DIFT's own ``F.grid_sample`` and the mutual nearest neighbours run on the device
(`match.mutual_nearest_neighbours`: FAISS-GPU for large searches); torch is imported only then.
Error: mean distance between the 4 image-1 corners
(0, 0), (0, h-1), (w-1, 0), (w-1, h-1) mapped by the estimate and by the ground truth;
correct at threshold th when error <= th, th in (1, 3, 5). Accuracy is the fraction of
correct pairs over all / ``i_`` / ``v_`` sequences. Where DIFT would crash (fewer than 4
matches, or OpenCV finds no homography) the pair counts as wrong (error = inf).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..core.errors import DitfError

THRESHOLDS = (1.0, 3.0, 5.0)
METHODS = {"lmeds": cv2.LMEDS, "ransac": cv2.RANSAC}
REPROJ_THRESHOLD = 3.0


def normalised_coordinates(keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """DIFT's grid coordinates: (p - c) / c with c = ((W - 1) / 2, (H - 1) / 2)."""
    w, h = size
    if w < 2 or h < 2:
        raise DitfError(f"image of {w}x{h} pixels is too small to normalise keypoints")
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0], dtype=np.float64)
    return (np.asarray(keypoints, dtype=np.float64) - c) / c


def sample_descriptors(feature, keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, D) float32 descriptors at (x, y) keypoints of an image of `size` = (W, H).

    `feature` is (rows, cols, D) (numpy or anything ``np.asarray`` takes, e.g. a CPU tensor).
    Semantics of ``F.grid_sample(feat, grid)`` with bilinear / zeros / align_corners=False.
    """
    feat = np.asarray(feature, dtype=np.float32)
    if feat.ndim != 3:
        raise DitfError(f"feature map must be (rows, cols, D), got shape {feat.shape}")
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    rows, cols, dim = feat.shape
    g = normalised_coordinates(kps, size)
    u = ((g[:, 0] + 1) * cols - 1) / 2  # align_corners=False unnormalisation
    v = ((g[:, 1] + 1) * rows - 1) / 2
    x0 = np.floor(u).astype(np.int64)
    y0 = np.floor(v).astype(np.int64)
    wx1 = (u - x0).astype(np.float32)
    wy1 = (v - y0).astype(np.float32)
    out = np.zeros((len(kps), dim), dtype=np.float32)
    for dy, wy in ((0, 1 - wy1), (1, wy1)):
        for dx, wx in ((0, 1 - wx1), (1, wx1)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < rows) & (xx >= 0) & (xx < cols)  # zero padding outside
            weight = (wy * wx)[ok]
            out[ok] += weight[:, None] * feat[yy[ok], xx[ok]]
    return out


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by max(||row||, eps), as ``F.normalize``."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def mutual_nearest_neighbours(desc_a: np.ndarray, desc_b: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(M, 2) index pairs (i in a, j in b) that are each other's nearest neighbour."""
    a = np.asarray(desc_a, dtype=np.float32)
    b = np.asarray(desc_b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DitfError(f"descriptor shapes {a.shape} and {b.shape} do not match")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if metric == "cosine":
        sim = l2_normalise(a) @ l2_normalise(b).T
    elif metric == "l2":
        sim = -((a**2).sum(1, keepdims=True) + (b**2).sum(1)[None] - 2 * a @ b.T)
    else:
        raise DitfError(f"unknown matching metric {metric!r}; use cosine or l2")
    nn12 = np.argmax(sim, axis=1)
    nn21 = np.argmax(sim, axis=0)
    ids = np.arange(len(a))
    keep = nn21[nn12] == ids
    return np.stack([ids[keep], nn12[keep]], axis=1).astype(np.int64)


def estimate_homography(
    pts_a: np.ndarray,
    pts_b: np.ndarray,
    method: str = "lmeds",
    threshold: float = REPROJ_THRESHOLD,
) -> np.ndarray | None:
    """``cv2.findHomography(pts_a, pts_b, method, threshold)``; None when it cannot (< 4 points)."""
    if method not in METHODS:
        raise DitfError(f"unknown homography method {method!r}; use {' or '.join(METHODS)}")
    pts_a = np.asarray(pts_a, dtype=np.float32).reshape(-1, 1, 2)
    pts_b = np.asarray(pts_b, dtype=np.float32).reshape(-1, 1, 2)
    if len(pts_a) < 4:
        return None
    try:
        H, _ = cv2.findHomography(pts_a, pts_b, METHODS[method], ransacReprojThreshold=threshold)
    except cv2.error:
        return None
    if H is None or H.shape != (3, 3) or not np.all(np.isfinite(H)):
        return None
    return H.astype(np.float64)


def image_corners(size: tuple[int, int]) -> np.ndarray:
    """DIFT's corner order: (0, 0), (0, h-1), (w-1, 0), (w-1, h-1), as (4, 2) (x, y)."""
    w, h = size
    return np.array([[0, 0], [0, h - 1], [w - 1, 0], [w - 1, h - 1]], dtype=np.float64)


def warp_points(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.concatenate([np.asarray(points, dtype=np.float64), np.ones((len(points), 1))], axis=1)
    out = pts @ np.asarray(H, dtype=np.float64).T
    return out[:, :2] / out[:, 2:]


def corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, size: tuple[int, int]) -> float:
    """Mean distance of the 4 corners of image 1 (size = (W, H)) warped by H_est vs H_gt."""
    if H_est is None:
        return float("inf")
    corners = image_corners(size)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = float(np.mean(np.linalg.norm(warp_points(H_gt, corners) - warp_points(H_est, corners), axis=1)))
    return err if np.isfinite(err) else float("inf")


@dataclass
class HomographyEstimate:
    H: np.ndarray | None
    n_keypoints: tuple[int, int]
    n_matches: int
    error: float  # corner error in pixels (inf when no homography)


def unique_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """DIFT's ``np.unique(keypoints, axis=0)``: sorted, duplicates removed."""
    return np.unique(np.asarray(keypoints, dtype=np.float64).reshape(-1, 2), axis=0)


def match_pair(
    feature_a,
    feature_b,
    keypoints_a: np.ndarray,
    keypoints_b: np.ndarray,
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    H_gt: np.ndarray | None = None,
    method: str = "lmeds",
    metric: str = "cosine",
    threshold: float = REPROJ_THRESHOLD,
    device: str | None = None,
) -> HomographyEstimate:
    """Sample descriptors, match (MNN), estimate H (image a -> image b) and, with H_gt, score.

    `device` "cuda[:N]": descriptors and cosine MNN on that GPU (numpy otherwise).
    """
    kps_a, kps_b = unique_keypoints(keypoints_a), unique_keypoints(keypoints_b)
    if device is not None and not str(device).startswith("cpu") and metric == "cosine":
        matches = _device_matches(feature_a, feature_b, kps_a, kps_b, size_a, size_b, str(device))
    else:
        desc_a = sample_descriptors(np.asarray(feature_a), kps_a, size_a)
        desc_b = sample_descriptors(np.asarray(feature_b), kps_b, size_b)
        matches = mutual_nearest_neighbours(desc_a, desc_b, metric)
    H = estimate_homography(kps_a[matches[:, 0]], kps_b[matches[:, 1]], method, threshold)
    error = corner_error(H, H_gt, size_a) if H_gt is not None else float("nan")
    return HomographyEstimate(H=H, n_keypoints=(len(kps_a), len(kps_b)), n_matches=len(matches), error=error)


def _device_matches(feature_a, feature_b, kps_a, kps_b, size_a, size_b, device: str) -> np.ndarray:
    """Cosine mutual nearest neighbours computed on a GPU, as (M, 2) host indices."""
    import torch
    import torch.nn.functional as F

    from .device import mutual_nearest_neighbours as device_mnn

    def descriptors(feature, kps, size):
        grid = torch.as_tensor(feature).to(device=device, dtype=torch.float32)  # (rows, cols, D)
        if grid.ndim != 3:
            raise DitfError(f"feature map must be (rows, cols, D), got shape {tuple(grid.shape)}")
        g = torch.as_tensor(normalised_coordinates(kps, size), dtype=torch.float32, device=device)
        sampled = F.grid_sample(grid.permute(2, 0, 1)[None], g[None, None], mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        return sampled[0, :, 0].T  # (N, D)

    matches = device_mnn(descriptors(feature_a, kps_a, size_a), descriptors(feature_b, kps_b, size_b))
    return matches.cpu().numpy().astype(np.int64)


def homography_accuracy(
    errors: Sequence[float],
    kinds: Iterable[str],
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, dict]:
    """{"overall" | "illumination" | "viewpoint": {"n": pairs, "acc@1": %, ...}} (error <= th)."""
    errors = np.asarray(list(errors), dtype=np.float64)
    kinds = np.asarray(list(kinds))
    if len(errors) != len(kinds):
        raise DitfError(f"{len(errors)} errors but {len(kinds)} sequence kinds")
    if len(kinds) and not np.isin(kinds, ["i", "v"]).all():
        raise DitfError("sequence kinds must be 'i' (illumination) or 'v' (viewpoint)")
    groups = {
        "overall": np.ones(len(errors), bool),
        "illumination": kinds == "i",
        "viewpoint": kinds == "v",
    }
    out: dict[str, dict] = {}
    for name, sel in groups.items():
        row: dict = {"n": int(sel.sum())}
        for th in thresholds:
            label = f"acc@{th:g}"
            row[label] = float(100.0 * np.mean(errors[sel] <= th)) if sel.any() else float("nan")
        out[name] = row
    return out
