"""A tiny synthetic ADE20K (ADEChallengeData2016 layout) whose classes are decided by colour.

Every image is a background region plus a few rectangles and ellipses; each region belongs to
one of `n_classes` classes (annotation values 1..n_classes, i.e. classes 0..n_classes-1 after
``reduce_zero_label``) and is painted in that class's colour with mild noise, so a linear head
on colour features can segment it almost perfectly. A thin grey frame around some shapes is
labelled 0 ("other"), which the benchmark ignores. Same arguments -> byte-identical files.

    <root>/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg
    <root>/annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png   (mode L)
    <root>/objectInfo150.txt, sceneCategories.txt                           (as in the release)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..datasets.ade20k import CLASSES
from ..core.errors import DitfError

#: class colours (class i -> PALETTE[i]); well apart in RGB
PALETTE = (
    (200, 40, 40), (40, 170, 60), (40, 70, 210), (230, 210, 40), (150, 60, 190), (40, 200, 210),
    (240, 140, 30), (120, 120, 120),
)  # fmt: skip
_FRAME = (128, 128, 128)
_PREFIX = {"training": "ADE_train", "validation": "ADE_val"}
_SUBDIRS = ("images", "annotations")
_SPLIT_SEEDS = {"training": 1, "validation": 2}


def _image(rng: np.random.Generator, width: int, height: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), annotation values uint8 (H, W))."""
    values = Image.new("L", (width, height), int(rng.integers(n_classes)) + 1)
    draw = ImageDraw.Draw(values)
    for _ in range(int(rng.integers(2, 5))):
        w = int(rng.integers(width // 4, width // 2 + 1))
        h = int(rng.integers(height // 4, height // 2 + 1))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        box = [x, y, x + w, y + h]
        value = int(rng.integers(n_classes)) + 1
        framed = bool(rng.random() < 0.3)
        if rng.random() < 0.5:
            draw.rectangle(box, fill=value, outline=0 if framed else value, width=2)
        else:
            draw.ellipse(box, fill=value, outline=0 if framed else value, width=2)
    labels = np.asarray(values, dtype=np.uint8)
    colours = np.array([_FRAME, *PALETTE[:n_classes]], dtype=np.float64)
    pixels = colours[labels] + rng.normal(0.0, 8.0, size=(height, width, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels


def make_ade20k_demo(
    root: Path | str,
    n_training: int = 12,
    n_validation: int = 6,
    n_classes: int = 5,
    image_size: tuple[int, int] = (96, 64),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny ADE20K-layout dataset (both splits) under `root` and return `root`.

    `image_size` is the nominal (W, H); every other image is transposed (portrait) so sizes
    vary as in the real data. `root` must be empty or absent unless `overwrite`, which deletes
    only the ``images`` and ``annotations`` folders first.
    """
    root = Path(root)
    if not 1 <= n_classes <= len(PALETTE):
        raise DitfError(f"make_ade20k_demo: n_classes must be 1..{len(PALETTE)}, got {n_classes}")
    if n_training < 1 or n_validation < 1:
        raise DitfError("make_ade20k_demo: need at least one training and one validation image")
    if min(image_size) < 32:
        raise DitfError(f"make_ade20k_demo: image_size {image_size} too small (min side 32)")
    if root.exists() and not root.is_dir():
        raise DitfError(f"demo root {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DitfError(f"demo root {root} is not empty; pick a new folder or pass overwrite=True")
        for sub in _SUBDIRS:
            shutil.rmtree(root / sub, ignore_errors=True)
    for split, count in (("training", n_training), ("validation", n_validation)):
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, _SPLIT_SEEDS[split]])
        for i in range(count):
            width, height = image_size if i % 2 == 0 else image_size[::-1]
            pixels, labels = _image(rng, width, height, n_classes)
            stem = f"{_PREFIX[split]}_{i + 1:08d}"
            Image.fromarray(pixels, "RGB").save(image_dir / f"{stem}.jpg", format="JPEG", quality=95, subsampling=0)
            Image.fromarray(labels, "L").save(label_dir / f"{stem}.png", format="PNG")
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i + 1}\t0\t0\t0\t{name}" for i, name in enumerate(CLASSES)]
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    scenes = [f"{_PREFIX[s]}_{i + 1:08d} demo" for s, n in (("training", n_training), ("validation", n_validation))
              for i in range(n)]
    (root / "sceneCategories.txt").write_text("\n".join(scenes) + "\n", encoding="utf-8")
    return root

