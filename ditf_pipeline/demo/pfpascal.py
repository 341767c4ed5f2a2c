"""A tiny synthetic PF-Pascal in GeoAware-SC's layout, with exactly known correspondences.

Written under `root` (which plays the ``PF-dataset-PASCAL`` folder)::

    JPEGImages/<voc-like stem>.jpg            flat, like PF-Pascal
    test_pairs_pf_pascal.csv                  source_image,target_image,class,XA,YA,XB,YB

Image columns read ``PF-dataset-PASCAL/JPEGImages/<stem>.jpg`` as in the public list. Images are
drawn by the SPair demo's renderer (`ditf_pipeline.demo.spair`): one synthetic object per class
with 8 coloured parts; each CSV row lists the parts visible in both images, in part order, at
their exact integer pixel centres. Same arguments -> byte-identical files; well under a second.
"""

from __future__ import annotations

import csv
import io
import shutil
import zlib
from itertools import combinations
from pathlib import Path

import numpy as np

from ..datasets.pfpascal import CLASSES, PF_FOLDER
from ..core.errors import DitfError
from .spair import _MIN_VISIBLE, _SCALES, _render

_HEADER = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")


def make_pfpascal_demo(
    root: Path | str,
    categories: tuple[str, ...] = ("cat", "car"),
    pairs_per_category: int = 3,
    image_size: tuple[int, int] = (160, 120),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny PF-Pascal (split ``test``) under `root` and return `root`.

    `categories` must be PASCAL class names. Each class gets n images (n*(n-1)/2 >=
    pairs_per_category, scaled 0.9/1.0/1.1 so sizes differ, the second one mirrored); pairs are
    image combinations in order. `root` must be empty or absent unless `overwrite`, which first
    deletes only what this function writes (JPEGImages, test_pairs_pf_pascal.csv).
    """
    root = Path(root)
    if pairs_per_category < 1 or not categories:
        raise DitfError("make_pfpascal_demo: need at least one category and pairs_per_category >= 1")
    for category in categories:
        if category not in CLASSES:
            raise DitfError(f"make_pfpascal_demo: bad category {category!r}; PASCAL classes: {', '.join(CLASSES)}")
    if min(image_size) < 48:
        raise DitfError(f"make_pfpascal_demo: image_size {image_size} too small (min side 48)")
    if root.exists() and not root.is_dir():
        raise DitfError(f"demo root {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DitfError(f"demo root {root} is not empty; pick a new folder or pass overwrite=True")
        shutil.rmtree(root / "JPEGImages", ignore_errors=True)
        (root / "test_pairs_pf_pascal.csv").unlink(missing_ok=True)

    n_images = 2
    while n_images * (n_images - 1) // 2 < pairs_per_category:
        n_images += 1
    img_dir = root / "JPEGImages"
    img_dir.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_HEADER)
    counter = 0
    for category in categories:
        rng = np.random.default_rng([seed, zlib.crc32(b"pfpascal:" + category.encode())])
        body = tuple(int(c) for c in rng.integers(60, 200, size=3))
        images = []
        for i in range(n_images):
            factor = _SCALES[int(rng.integers(len(_SCALES)))] if i else 1.0
            width, height = (2 * round(side * factor / 2) for side in image_size)
            for _attempt in range(100):
                canvas, kps, _bbox, _trunc, _occ, _scale = _render(rng, body, width, height, i == 1)
                if sum(k is not None for k in kps) >= _MIN_VISIBLE:
                    break
            else:  # pragma: no cover - the SPair demo's ranges make this unreachable
                raise RuntimeError("demo generator could not place the object")
            counter += 1
            stem = f"2099_{counter:06d}"  # VOC-like, unique across classes (flat JPEGImages)
            canvas.save(img_dir / f"{stem}.jpg", format="JPEG", quality=95, subsampling=0)
            images.append((stem, kps))
        for a, b in list(combinations(range(n_images), 2))[:pairs_per_category]:
            (src, src_kps), (trg, trg_kps) = images[a], images[b]
            ids = [k for k in range(len(src_kps)) if src_kps[k] is not None and trg_kps[k] is not None]
            writer.writerow(
                (
                    f"{PF_FOLDER}/JPEGImages/{src}.jpg",
                    f"{PF_FOLDER}/JPEGImages/{trg}.jpg",
                    CLASSES.index(category) + 1,
                    ";".join(str(src_kps[k][0]) for k in ids),
                    ";".join(str(src_kps[k][1]) for k in ids),
                    ";".join(str(trg_kps[k][0]) for k in ids),
                    ";".join(str(trg_kps[k][1]) for k in ids),
                )
            )
    (root / "test_pairs_pf_pascal.csv").write_text(out.getvalue(), encoding="utf-8")
    return root
