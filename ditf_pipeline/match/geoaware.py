"""The ``geoaware`` protocol (GeoAware-SC, github.com/Junyi42/GeoAware-SC): 60 x 60 descriptors of
the padded 840 x 840 frame, hard or window-soft argmax, predictions mapped back to original
pixels. See `GeoAwareMatcher`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DitfError
from ..core.naming import PROTOCOL_RULES
from .cache import ByteLRU
from .device import nearest_neighbours
from .grids import ImageSize, check_grid, check_size, integer_keypoints
from .threads import ScratchBuffers

#: default byte budget of the per-target descriptor cache (`ByteLRU`)
GEOAWARE_CACHE_BYTES = 192 * 2**20  # 3600 x 3072 float32 descriptors are 44 MB: 4 targets

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
    width, height = check_size(size, "image")
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
        self._scratch = ScratchBuffers()

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
        size = check_size(src_img_size, "source")
        kps = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
        integer_keypoints(kps, size)  # validation only: geoaware keeps sub-pixel keypoints
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
        src, trg = check_grid(src_feat, "source"), check_grid(trg_feat, "target")
        src_size, trg_size = check_size(src_img_size, "source"), check_size(trg_img_size, "target")
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
