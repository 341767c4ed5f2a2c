"""HPatches sequences reader (homography estimation, as evaluated by DIFT).

    hpatches-sequences-release/<i_name | v_name>/{1..6}.ppm
    hpatches-sequences-release/<seq>/H_1_2 .. H_1_6     plain-text 3x3 homography, image 1 -> k
    superpoint-1k/<seq>-<n>.kp                          optional keypoints (DIFT's eval_hpatches.py)

`root` may be the ``hpatches-sequences-release`` folder itself or a folder holding it.
Sequences are the sub-folders named ``i_*`` (illumination) and ``v_*`` (viewpoint); anything
else is ignored. Pairs are (1, k) for k = 2..6 with the ground-truth H_1_k.

Keypoints: DIFT samples descriptors at the 1k SuperPoint keypoints it distributes as
``superpoint-1k/<seq>-<n>.kp`` (text, one ``x y`` row per point in original pixels, read with
``np.loadtxt``). The keypoint folder is the `keypoints` option, else ``superpoint-1k`` next to
or inside the root when present; without one every image gets a regular grid of about
`grid_points` points (pixel centres of a grid with the image's aspect). `keypoint_source`
says which was used, for the score report.

All files are text or images: parsed with numpy / PIL, never unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DitfError
from ..core.images import image_size
from . import register
from .base import Dataset, ImageRecord

N_IMAGES = 6
KEYPOINT_DIR = "superpoint-1k"
RELEASE_DIR = "hpatches-sequences-release"
SPLITS = ("all", "i", "v")


@dataclass(frozen=True)
class HomographyPair:
    """Image 1 -> image k of one sequence, with the ground-truth homography (original pixels)."""

    sequence: str
    src_key: str
    trg_key: str
    H: np.ndarray  # 3x3 float64, maps (x, y, 1) of the source to the target
    src_size: tuple[int, int]  # (width, height)
    trg_size: tuple[int, int]
    kind: str  # "i" (illumination) or "v" (viewpoint)

    @property
    def pair_id(self) -> str:
        return f"{self.sequence}/1-{self.trg_key.rsplit('/', 1)[1]}"


def read_homography(path: Path) -> np.ndarray:
    """A 3x3 homography from a whitespace-separated text file (9 finite numbers, invertible)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise DitfError(f"HPatches homography {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DitfError(f"cannot read HPatches homography {path}: {exc}") from exc
    tokens = text.split()
    if len(tokens) != 9:
        raise DitfError(f"{path}: expected 9 numbers (a 3x3 matrix), found {len(tokens)}")
    try:
        values = [float(t) for t in tokens]
    except ValueError as exc:
        raise DitfError(f"{path}: not a matrix of numbers ({exc})") from exc
    H = np.asarray(values, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(H)):
        raise DitfError(f"{path}: homography holds non-finite values")
    if abs(np.linalg.det(H)) < 1e-12:
        raise DitfError(f"{path}: homography is singular")
    return H


def read_keypoints(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(N, 2) float64 (x, y) from a ``.kp`` text file; points must lie on the image (half-pixel margin)."""
    try:
        with open(path, encoding="ascii") as handle:
            kps = np.loadtxt(handle, dtype=np.float64, ndmin=2)
    except FileNotFoundError:
        raise DitfError(f"HPatches keypoint file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DitfError(f"cannot read HPatches keypoint file {path}: {exc}") from exc
    if kps.size == 0:
        raise DitfError(f"HPatches keypoint file {path} holds no points")
    if kps.shape[1] != 2:
        raise DitfError(f"{path}: expected two columns (x y) per line, got {kps.shape[1]}")
    if not np.all(np.isfinite(kps)):
        raise DitfError(f"{path}: keypoints hold non-finite values")
    w, h = size
    if kps[:, 0].min() < -0.5 or kps[:, 1].min() < -0.5 or kps[:, 0].max() > w - 0.5 or kps[:, 1].max() > h - 0.5:
        raise DitfError(f"{path}: keypoints fall outside the {w}x{h} image")
    return kps


def grid_keypoints(size: tuple[int, int], n_points: int = 1000) -> np.ndarray:
    """About `n_points` (x, y) pixel positions on a regular grid with the image's aspect ratio.

    Grid cell centres: x = (i + 0.5) * W / nx - 0.5, so the grid is symmetric in the image.
    """
    w, h = size
    nx = max(1, round(math.sqrt(n_points * w / h)))
    ny = max(1, round(n_points / nx))
    xs = (np.arange(nx) + 0.5) * w / nx - 0.5
    ys = (np.arange(ny) + 0.5) * h / ny - 0.5
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


@register
class HPatches(Dataset):
    """HPatches full sequences (116 in the release: 57 illumination, 59 viewpoint)."""

    name = "hpatches"
    exif_transpose = False  # annotations in the stored pixel orientation
    task = "homography"
    alphas = ()
    threshold_rule = "mean distance of the 4 warped image corners <= 1 / 3 / 5 px (DIFT eval_homography.py)"

    def __init__(
        self,
        root: Path | str,
        split: str | None = None,
        keypoints: Path | str | None = None,
        grid_points: int = 1000,
    ) -> None:
        super().__init__(root, split or "all")
        if self.split not in SPLITS:
            raise DitfError(f"unknown HPatches split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DitfError(f"HPatches root {self.root} does not exist or is not a directory")
        self.release = self.root / RELEASE_DIR if (self.root / RELEASE_DIR).is_dir() else self.root
        if not self._sequence_dirs():
            raise DitfError(
                f"{self.root} does not look like HPatches: no i_* or v_* sequence folders in {self.release}"
            )
        if int(grid_points) < 4:
            raise DitfError(f"HPatches grid_points must be >= 4, got {grid_points}")
        self.grid_points = int(grid_points)
        if keypoints is not None:
            self.keypoint_dir: Path | None = Path(keypoints)
            if not self.keypoint_dir.is_dir():
                raise DitfError(f"HPatches keypoint folder {self.keypoint_dir} does not exist")
        else:
            found = [p / KEYPOINT_DIR for p in (self.release, self.release.parent) if (p / KEYPOINT_DIR).is_dir()]
            self.keypoint_dir = found[0] if found else None
        self._images: list[ImageRecord] | None = None
        self._sizes: dict[str, tuple[int, int]] = {}

    @property
    def keypoint_source(self) -> str:
        if self.keypoint_dir is not None:
            return f"keypoint files {self.keypoint_dir}/<seq>-<n>.kp"
        return f"regular grid of ~{self.grid_points} points per image (no keypoint folder)"

    def _sequence_dirs(self) -> list[Path]:
        dirs = sorted(
            p for p in self.release.iterdir() if p.is_dir() and (p.name.startswith("i_") or p.name.startswith("v_"))
        )
        if self.split != "all":
            dirs = [p for p in dirs if p.name.startswith(f"{self.split}_")]
        return dirs

    def sequences(self) -> list[str]:
        """Sequence names, sorted (DIFT iterates ``sorted(os.listdir(...))``)."""
        return [p.name for p in self._sequence_dirs()]

    # -- Dataset API --------------------------------------------------------------------------
    def images(self) -> list[ImageRecord]:
        """1.ppm .. 6.ppm of every sequence, key ``<seq>/<n>``; category None (no class)."""
        if self._images is None:
            records = []
            for seq_dir in self._sequence_dirs():
                for n in range(1, N_IMAGES + 1):
                    path = seq_dir / f"{n}.ppm"
                    if not path.is_file():
                        raise DitfError(f"HPatches image {path} is missing")
                    records.append(ImageRecord(key=f"{seq_dir.name}/{n}", path=path, category=None))
            self._images = records
        return list(self._images)

    def category_of(self, key: str) -> str | None:
        return None

    def _path(self, key: str) -> Path:
        seq, _, n = key.partition("/")
        if not n.isdigit() or not 1 <= int(n) <= N_IMAGES or seq not in self.sequences():
            raise DitfError(f"unknown HPatches image key {key!r}")
        return self.release / seq / f"{n}.ppm"

    def size_of(self, key: str) -> tuple[int, int]:
        """(width, height) of an image, from its header."""
        if key not in self._sizes:
            self._sizes[key] = image_size(self._path(key), exif_transpose=self.exif_transpose)
        return self._sizes[key]

    def keypoints(self, key: str) -> np.ndarray:
        """(N, 2) float64 (x, y) keypoints of image `key` in original pixels."""
        size = self.size_of(key)
        if self.keypoint_dir is None:
            return grid_keypoints(size, self.grid_points)
        seq, _, n = key.partition("/")
        return read_keypoints(self.keypoint_dir / f"{seq}-{n}.kp", size)

    def homography_pairs(self) -> list[HomographyPair]:
        """(1, k) for k = 2..6 of every sequence, in sequence order."""
        pairs = []
        for seq in self.sequences():
            src = f"{seq}/1"
            for k in range(2, N_IMAGES + 1):
                trg = f"{seq}/{k}"
                pairs.append(
                    HomographyPair(
                        sequence=seq,
                        src_key=src,
                        trg_key=trg,
                        H=read_homography(self.release / seq / f"H_1_{k}"),
                        src_size=self.size_of(src),
                        trg_size=self.size_of(trg),
                        kind=seq[0],
                    )
                )
        return pairs
