"""A tiny synthetic DAVIS-2017 (split ``val``), in the real layout, with exact masks.

Two short sequences of uniformly coloured shapes sliding over uniformly coloured backgrounds:

* ``demo-disc``: one red disc moving right and slightly down over a blue background;
* ``demo-pair``: a green square moving right and a yellow disc moving left over a grey-brown
  background (two objects, ids 1 and 2; they never overlap).

Frames are JPEGs (quality 95) and every frame has an indexed-PNG annotation with the DAVIS
palette, so both propagation (first annotation) and scoring (all annotations) run on it. The
shapes are drawn on a 4x supersampled canvas and the mask is the shape at full resolution, so
the annotation is exact up to the JPEG's colour noise. Same arguments -> byte-identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..datasets.davis import davis_palette, write_mask
from ..core.errors import DitfError

_SUBDIRS = ("JPEGImages", "Annotations", "ImageSets")

#: sequence -> (background RGB, [(shape, RGB, start centre (x, y), velocity (dx, dy), half size)])
SEQUENCES = {
    "demo-disc": (
        (40, 70, 190),
        [("disc", (210, 40, 40), (22.0, 26.0), (5.0, 1.0), 11.0)],
    ),
    "demo-pair": (
        (120, 100, 80),
        [
            ("square", (40, 190, 70), (16.0, 18.0), (4.0, 0.5), 9.0),
            ("disc", (230, 210, 40), (78.0, 46.0), (-4.0, -0.5), 9.0),
        ],
    ),
}


def _frame(width: int, height: int, background, shapes, t: int) -> tuple[Image.Image, np.ndarray]:
    """Frame t: (RGB image, uint8 label map); shapes move linearly in time."""
    ss = 4  # supersampling for the antialiased RGB frame
    rgb = Image.new("RGB", (width * ss, height * ss), background)
    draw = ImageDraw.Draw(rgb)
    labels = Image.new("L", (width, height), 0)
    draw_labels = ImageDraw.Draw(labels)
    for obj_id, (shape, colour, (x0, y0), (vx, vy), half) in enumerate(shapes, 1):
        x, y = x0 + vx * t, y0 + vy * t
        box = [x - half, y - half, x + half, y + half]
        big = [v * ss for v in box]
        # label box in pixel-centre coordinates: pixel (i, j) covers [i, i+1) x [j, j+1)
        small = [box[0], box[1], box[2] - 1, box[3] - 1]
        if shape == "disc":
            draw.ellipse(big, fill=colour)
            draw_labels.ellipse(small, fill=obj_id)
        else:
            draw.rectangle([big[0], big[1], big[2] - 1, big[3] - 1], fill=colour)
            draw_labels.rectangle(small, fill=obj_id)
    rgb = rgb.resize((width, height), Image.Resampling.BOX)
    return rgb, np.asarray(labels)


def make_davis_demo(
    root: Path | str,
    n_frames: int = 8,
    image_size: tuple[int, int] = (96, 64),
    overwrite: bool = False,
) -> Path:
    """Write the demo under `root` (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt).

    `root` must be empty or absent unless `overwrite`, which deletes only the three DAVIS
    folders first. Returns `root`.
    """
    root = Path(root)
    width, height = image_size
    if n_frames < 3:
        raise DitfError("make_davis_demo: need at least 3 frames (the scorer drops the first and the last)")
    if width < 64 or height < 48:
        raise DitfError(f"make_davis_demo: image_size {image_size} too small (min 64x48)")
    if root.exists() and not root.is_dir():
        raise DitfError(f"demo root {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DitfError(f"demo root {root} is not empty; pick a new folder or pass overwrite=True")
        for sub in _SUBDIRS:
            shutil.rmtree(root / sub, ignore_errors=True)
    palette = davis_palette()
    scale_x, scale_y = width / 96.0, height / 64.0
    for name, (background, shapes) in SEQUENCES.items():
        scaled = [
            (shape, colour, (x * scale_x, y * scale_y), (vx * scale_x * 8 / n_frames, vy * scale_y * 8 / n_frames),
             half * min(scale_x, scale_y))
            for shape, colour, (x, y), (vx, vy), half in shapes
        ]  # fmt: skip
        image_dir = root / "JPEGImages" / "480p" / name
        mask_dir = root / "Annotations" / "480p" / name
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            rgb, labels = _frame(width, height, background, scaled, t)
            rgb.save(image_dir / f"{t:05d}.jpg", format="JPEG", quality=95)
            write_mask(mask_dir / f"{t:05d}.png", labels, palette)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("".join(f"{name}\n" for name in SEQUENCES), encoding="utf-8")
    return root
