"""A tiny synthetic HPatches, in the real layout, with exactly known homographies.

Two sequences under ``hpatches-sequences-release/``:

* ``i_demo``: the same view six times under different per-channel gains and offsets
  (H_1_k = identity, as in the real illumination sequences);
* ``v_demo``: six views of one planar texture related by known homographies (rotation,
  scale, shear, translation and a little perspective about the image centre).

The texture is a smooth random colour field with random blobs, rendered on a canvas larger
than the view so warped images have no empty borders: view k is the canvas seen through
``H_1_k @ T``, written with ``cv2.warpPerspective`` (bilinear). A ``superpoint-1k`` folder
next to the release holds ``<seq>-<n>.kp`` keypoint files (Shi-Tomasi corners of each image,
up to 300), the format DIFT's evaluation reads. Same arguments -> byte-identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..datasets.hpatches import KEYPOINT_DIR, RELEASE_DIR
from ..core.errors import DitfError


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour noise + random discs and rectangles, uint8 (H, W, 3)."""
    coarse = rng.uniform(0, 255, size=(max(2, height // 12), max(2, width // 12), 3)).astype(np.float32)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(width * height / 900)):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(3, 10))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, thickness=-1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(
                img,
                (x - r, y - r),
                (x + r, y + r // 2),
                colour,
                thickness=-1,
                lineType=cv2.LINE_AA,
            )
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _homography(rng: np.random.Generator, width: int, height: int, strength: float) -> np.ndarray:
    """A random homography about the image centre; `strength` in (0, 1]."""
    angle = np.deg2rad(rng.uniform(-12, 12) * strength)
    scale = 1.0 + rng.uniform(-0.15, 0.15) * strength
    shear = rng.uniform(-0.08, 0.08) * strength
    tx, ty = rng.uniform(-0.06, 0.06, size=2) * strength * np.array([width, height])
    px, py = rng.uniform(-4e-4, 4e-4, size=2) * strength * 100.0 / max(width, height)
    c, s = np.cos(angle), np.sin(angle)
    A = np.array([[scale * c, -scale * s + shear, tx], [scale * s, scale * c, ty], [px, py, 1.0]])
    centre = np.array([[1, 0, (width - 1) / 2], [0, 1, (height - 1) / 2], [0, 0, 1.0]])
    H = centre @ A @ np.linalg.inv(centre)
    return H / H[2, 2]


def _write_ppm(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb, "RGB").save(path, format="PPM")


def _write_h(path: Path, H: np.ndarray) -> None:
    path.write_text(
        "".join(" ".join(f"{v:.10g}" for v in row) + "\n" for row in H),
        encoding="ascii",
    )


def _write_kp(path: Path, rgb: np.ndarray) -> None:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    corners = cv2.goodFeaturesToTrack(gray, maxCorners=300, qualityLevel=0.01, minDistance=3)
    pts = np.zeros((0, 2)) if corners is None else corners.reshape(-1, 2).astype(np.float64)
    path.write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in pts), encoding="ascii")


def make_hpatches_demo(
    root: Path | str,
    image_size: tuple[int, int] = (160, 120),
    seed: int = 0,
    keypoints: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``<root>/hpatches-sequences-release/{i_demo,v_demo}`` (+ ``superpoint-1k``); return root."""
    root = Path(root)
    width, height = image_size
    if width < 64 or height < 48:
        raise DitfError(f"make_hpatches_demo: image_size {image_size} too small (min 64x48)")
    if root.exists() and not root.is_dir():
        raise DitfError(f"demo root {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DitfError(f"demo root {root} is not empty; pick a new folder or pass overwrite=True")
        for sub in (RELEASE_DIR, KEYPOINT_DIR):
            shutil.rmtree(root / sub, ignore_errors=True)
    rng = np.random.default_rng(seed)
    release = root / RELEASE_DIR
    kp_dir = root / KEYPOINT_DIR
    if keypoints:
        kp_dir.mkdir(parents=True, exist_ok=True)

    # Canvas twice the view; view 1 is its centre: canvas point = view point + offset.
    cw, ch = 2 * width, 2 * height
    ox, oy = (cw - width) / 2.0, (ch - height) / 2.0
    to_canvas = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1.0]])
    for name in ("i_demo", "v_demo"):
        seq_dir = release / name
        seq_dir.mkdir(parents=True, exist_ok=True)
        canvas = _texture(rng, cw, ch)
        for k in range(1, 7):
            if name.startswith("i_") or k == 1:
                H = np.eye(3)
            else:
                H = _homography(rng, width, height, strength=0.4 + 0.12 * k)
                H = np.array([[float(f"{v:.10g}") for v in row] for row in H])  # exactly what H_1_k says
            # view_k(q) = canvas(T H^-1 q): warpPerspective maps src -> dst by M = H T^-1
            M = H @ np.linalg.inv(to_canvas)
            view = cv2.warpPerspective(
                canvas,
                M,
                (width, height),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )
            if name.startswith("i_") and k > 1:
                gain = rng.uniform(0.55, 1.35, size=3)
                bias = rng.uniform(-25, 25, size=3)
                view = np.clip(np.rint(view.astype(np.float64) * gain + bias), 0, 255).astype(np.uint8)
            _write_ppm(seq_dir / f"{k}.ppm", view)
            if k > 1:
                _write_h(seq_dir / f"H_1_{k}", H)
            if keypoints:
                _write_kp(kp_dir / f"{name}-{k}.kp", view)
    return root
