"""A tiny synthetic SPair-71k, in the real layout, with exactly known correspondences.

`ditf demo` and the tests of every stage run on it, so it must be fast (well under a second),
byte-identical for a given seed, and readable by the same `spair` reader as the real dataset.

Each category has one synthetic "animal": a body ellipse (category colour) carrying 8 keypoint
parts, each a small disc with a distinctive colour/pattern, plus an off-axis tail:

    id  name          object coords (u, v)  mirror partner
    0   top           ( 0.00, -0.55)        -
    1   left_upper    (+0.55, -0.25)        2     (object's own left = viewer's right)
    2   right_upper   (-0.55, -0.25)        1
    3   centre        ( 0.00,  0.05)        -     (two-colour disc: not mirror-symmetric)
    4   left_lower    (+0.50,  0.45)        5
    5   right_lower   (-0.50,  0.45)        4
    6   tail          (+1.15,  0.20)        -     (sticks out on one side)
    7   bottom        ( 0.00,  0.70)        -

Every image is the object under translation, scale and optionally a horizontal flip, on its own
random background. Flips follow SPair's semantics: a left/right pair looks identical, and
annotators name parts by the *object's* left and right, so in a mirrored image id 1 sits where
the mirrored id-2 disc landed; unique parts (0, 3, 6, 7) just move with the mirror. Keypoints
are integer pixel centres of the drawn discs (the drawing is done at those exact integers), so
src_kps[i] and trg_kps[i] show the same coloured part. A keypoint counts as visible when its
centre lies inside the image (1 px margin) and no grey occluder square covers it; each pair
lists only keypoints visible in both images, in id order, as SPair does.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.errors import DitfError

KEYPOINT_NAMES = ("top", "left_upper", "right_upper", "centre", "left_lower", "right_lower", "tail", "bottom")
_U = (0.0, 0.55, -0.55, 0.0, 0.50, -0.50, 1.15, 0.0)
_V = (-0.55, -0.25, -0.25, 0.05, 0.45, 0.45, 0.20, 0.70)
_PARTNER = (None, 2, 1, None, 5, 4, None, None)
# (outer colour, inner colour, pattern): "dot" = disc with a centre dot (mirror symmetric),
# "half" = left/right halves in two colours (changes under a mirror).
_LOOK = (
    ((230, 30, 30), (255, 255, 255), "dot"),
    ((240, 220, 40), (20, 20, 20), "dot"),
    ((240, 220, 40), (20, 20, 20), "dot"),
    ((40, 80, 230), (250, 140, 20), "half"),
    ((220, 40, 200), (40, 220, 220), "dot"),
    ((220, 40, 200), (40, 220, 220), "dot"),
    ((15, 15, 15), (250, 250, 250), "half"),
    ((40, 200, 60), (120, 40, 160), "dot"),
)
_OCCLUDER = (128, 128, 128)
_MIN_VISIBLE = 6  # of 8 per image, so any two images share at least 4 keypoints
_SCALES = (0.9, 1.0, 1.1)  # per-image size factors: src and trg sizes differ
_SUBDIRS = ("JPEGImages", "ImageAnnotation", "PairAnnotation", "Layout")


@dataclass
class _DemoImage:
    imname: str
    width: int
    height: int
    scale: float
    flip: bool
    kps: list[tuple[int, int] | None]  # by keypoint id, None = not visible
    bbox: list[int]  # x1, y1, x2, y2 (inclusive pixel coordinates)
    truncated: bool
    occluded: bool


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Gradient + stripes + mild noise, all random: every image gets a different background."""
    c1, c2 = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
    angle, freq, phase = rng.uniform(0, 2 * math.pi), rng.uniform(0.02, 0.08), rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    t = (proj - proj.min()) / max(np.ptp(proj), 1.0)
    img = c1 * (1 - t)[..., None] + c2 * t[..., None]
    img += 25.0 * np.sin(2 * math.pi * freq * (xs * math.sin(angle) - ys * math.cos(angle)) + phase)[..., None]
    img += rng.normal(0.0, 5.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_part(draw: ImageDraw.ImageDraw, x: int, y: int, r: int, look: tuple) -> None:
    outer, inner, pattern = look
    box = [x - r, y - r, x + r, y + r]
    if pattern == "half":
        draw.pieslice(box, 90, 270, fill=outer + (255,))  # left half
        draw.pieslice(box, -90, 90, fill=inner + (255,))  # right half
    else:
        draw.ellipse(box, fill=outer + (255,))
        d = max(1, r // 2)
        draw.ellipse([x - d, y - d, x + d, y + d], fill=inner + (255,))


def _render(
    rng: np.random.Generator, body_colour: tuple[int, int, int], width: int, height: int, flip: bool
) -> tuple[Image.Image, list[tuple[int, int] | None], list[int], bool, bool, float]:
    """One attempt at an image; returns (image, kps by id, bbox, truncated, occluded, scale)."""
    s = rng.uniform(0.26, 0.36) * min(width, height)  # body half-width in pixels
    r = max(3, round(0.13 * s))
    cx = int(rng.integers(round(0.75 * s), width - round(0.75 * s)))
    cy = int(rng.integers(round(0.6 * s), height - round(0.6 * s)))
    dx = [round(s * u) for u in _U]  # round() is odd-symmetric, so partners stay exact mirrors
    dy = [round(s * v) for v in _V]

    # Draw unflipped around the mirrored centre, then mirror the layer: exact pixel transform.
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ox = width - 1 - cx if flip else cx
    draw.ellipse([ox - s, cy - 0.78 * s, ox + s, cy + 0.78 * s], fill=body_colour + (255,))
    draw.line([(ox + 0.8 * s, cy + dy[6]), (ox + dx[6], cy + dy[6])], fill=body_colour + (255,), width=max(2, r))
    for j in range(len(_U)):
        _draw_part(draw, ox + dx[j], cy + dy[j], r, _LOOK[j])
    if flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    kps: list[tuple[int, int] | None] = []
    for i in range(len(_U)):
        sign = -1 if (flip and _PARTNER[i] is None) else 1
        x, y = cx + sign * dx[i], cy + dy[i]
        kps.append((x, y) if 1 <= x <= width - 2 and 1 <= y <= height - 2 else None)
    truncated = any(k is None for k in kps)

    alpha = np.asarray(layer)[..., 3]
    ys, xs = np.nonzero(alpha)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]

    canvas = Image.fromarray(_background(rng, width, height), "RGB")
    canvas.paste(layer, (0, 0), layer)
    occluded = False
    visible = [i for i, k in enumerate(kps) if k is not None]
    if visible and rng.random() < 0.4:
        ox_, oy_ = kps[visible[int(rng.integers(len(visible)))]]
        half = r + 2
        ImageDraw.Draw(canvas).rectangle([ox_ - half, oy_ - half, ox_ + half, oy_ + half], fill=_OCCLUDER)
        for i, k in enumerate(kps):
            if k is not None and abs(k[0] - ox_) <= half + 1 and abs(k[1] - oy_) <= half + 1:
                kps[i] = None
        occluded = True
    return canvas, kps, bbox, truncated, occluded, s


def _variation(a: float, b: float) -> int:
    ratio = max(a, b) / min(a, b)
    return 0 if ratio < 1.2 else (1 if ratio < 1.5 else 2)


def make_spair_demo(
    root: Path | str,
    categories: tuple[str, ...] = ("cat", "car"),
    pairs_per_category: int = 3,
    image_size: tuple[int, int] = (160, 120),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny SPair-71k-layout dataset (split ``test``) under `root` and return `root`.

    `image_size` is the nominal (W, H); each image is scaled by 0.9, 1.0 or 1.1 (aspect kept)
    so that source and target sizes differ, as in the real data. Images are shared between
    pairs (n images with n*(n-1)/2 >= pairs_per_category per category); the first pair of each
    category is always a mirror pair. Same arguments -> byte-identical files.
    `root` must be empty or absent unless `overwrite`, which deletes only the four SPair
    folders (JPEGImages, ImageAnnotation, PairAnnotation, Layout) first.
    """
    root = Path(root)
    if pairs_per_category < 1 or not categories:
        raise DitfError("make_spair_demo: need at least one category and pairs_per_category >= 1")
    if min(image_size) < 48:
        raise DitfError(f"make_spair_demo: image_size {image_size} too small (min side 48)")
    if root.exists() and not root.is_dir():
        raise DitfError(f"demo root {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DitfError(f"demo root {root} is not empty; pick a new folder or pass overwrite=True")
        for sub in _SUBDIRS:
            shutil.rmtree(root / sub, ignore_errors=True)

    n_images = 2
    while n_images * (n_images - 1) // 2 < pairs_per_category:
        n_images += 1
    pair_dir = root / "PairAnnotation" / "test"
    pair_dir.mkdir(parents=True, exist_ok=True)
    layout_lines: list[str] = []
    pair_id = 0
    for category in categories:
        if not category or "/" in category or "\\" in category or ":" in category or category in (".", ".."):
            raise DitfError(f"make_spair_demo: bad category name {category!r}")
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        body = tuple(int(c) for c in rng.integers(60, 200, size=3))
        images = _make_images(rng, category, body, n_images, image_size, root)
        for a, b in list(combinations(range(n_images), 2))[:pairs_per_category]:
            pair_id += 1
            name = _write_pair(pair_dir, pair_id, category, images[a], images[b])
            layout_lines.append(name)
    layout = root / "Layout" / "large"
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "test.txt").write_text("\n".join(layout_lines) + "\n", encoding="utf-8")
    return root


def _make_images(
    rng: np.random.Generator,
    category: str,
    body: tuple[int, ...],
    n_images: int,
    image_size: tuple[int, int],
    root: Path,
) -> list[_DemoImage]:
    img_dir, ann_dir = root / "JPEGImages" / category, root / "ImageAnnotation" / category
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n_images):
        factor = _SCALES[int(rng.integers(len(_SCALES)))] if i else 1.0
        width, height = (2 * round(side * factor / 2) for side in image_size)
        flip = i == 1 or (i > 1 and bool(rng.random() < 0.5))
        for _attempt in range(100):  # deterministic: the rng stream decides
            canvas, kps, bbox, truncated, occluded, scale = _render(rng, body, width, height, flip)
            if sum(k is not None for k in kps) >= _MIN_VISIBLE:
                break
        else:  # pragma: no cover - 100 misses in a row would be a bug in the ranges above
            raise RuntimeError("demo generator could not place the object")
        stem = f"demo_{i:04d}"
        canvas.save(img_dir / f"{stem}.jpg", format="JPEG", quality=95, subsampling=0)
        annotation = {
            "filename": f"{stem}.jpg",
            "src_database": "ditf-demo",
            "category": category,
            "image_width": width,
            "image_height": height,
            "image_depth": 3,
            "pose": "Frontal",
            "truncated": int(truncated),
            "occluded": int(occluded),
            "difficult": 0,
            "bndbox": bbox,
            "kps": {str(k): (list(p) if p is not None else None) for k, p in enumerate(kps)},
            "azimuth_id": 6 if flip else 2,
        }
        (ann_dir / f"{stem}.json").write_text(json.dumps(annotation), encoding="utf-8")
        out.append(_DemoImage(f"{stem}.jpg", width, height, scale, flip, kps, bbox, truncated, occluded))
    return out


def _write_pair(pair_dir: Path, pair_id: int, category: str, src: _DemoImage, trg: _DemoImage) -> str:
    ids = [i for i in range(len(KEYPOINT_NAMES)) if src.kps[i] is not None and trg.kps[i] is not None]
    data = {
        "pair_id": pair_id,
        "src_imname": src.imname,
        "trg_imname": trg.imname,
        "src_imsize": [src.width, src.height, 3],
        "trg_imsize": [trg.width, trg.height, 3],
        "src_bndbox": src.bbox,
        "trg_bndbox": trg.bbox,
        "category": category,
        "src_pose": "Frontal",
        "trg_pose": "Frontal",
        "src_kps": [list(src.kps[i]) for i in ids],
        "trg_kps": [list(trg.kps[i]) for i in ids],
        "kps_ids": [str(i) for i in ids],
        "mirror": int(src.flip != trg.flip),
        "viewpoint_variation": int(src.flip != trg.flip),
        "scale_variation": _variation(src.scale, trg.scale),
        "truncation": int(src.truncated) + 2 * int(trg.truncated),
        "occlusion": int(src.occluded) + 2 * int(trg.occluded),
    }
    name = f"{pair_id:06d}-{Path(src.imname).stem}-{Path(trg.imname).stem}:{category}"
    (pair_dir / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    return name
