"""A tiny synthetic AP-10K correspondence benchmark in GeoAware-SC's layout, exact answers.

Written under `root` (which plays ``data/ap-10k``)::

    ImageAnnotation/<family>/<species>/<id:012d>.json   merged COCO annotation + image record
    JPEGImages/<family>/<species>/<id:012d>.jpg
    PairAnnotation/test/<src>-<trg>:<species>.json               intra-species
    PairAnnotation/test_cross_species/<src>-<trg>:<family>.json  families with >= 2 species
    PairAnnotation/test_cross_family/<src>-<trg>:all.json        across families

Pair files hold only ``src_json_path`` / ``trg_json_path``, written as GeoAware's notebook does,
relative to its checkout (``data/ap-10k/ImageAnnotation/...``). Images come from the SPair demo's
renderer (`ditf_pipeline.demo.spair`): its 8 parts are stored in the AP-10K keypoint slots of
`PART_TO_SLOT` (visibility 2), the other 9 slots are ``[0, 0, 0]`` as in COCO. Keypoints are
exact integer pixel centres of the drawn parts, so src/trg keypoints visible in both show the
same part. Same arguments -> byte-identical files; well under a second.
"""

from __future__ import annotations

import json
import shutil
import zlib
from itertools import combinations, product
from pathlib import Path

import numpy as np

from ..datasets.ap10k import NUM_KEYPOINTS
from ..core.errors import DitfError
from .spair import _MIN_VISIBLE, _SCALES, _render

#: demo part id (top, left_upper, right_upper, centre, left_lower, right_lower, tail, bottom) ->
#: AP-10K slot (nose, left_shoulder, right_shoulder, neck, left_hip, right_hip, root_of_tail,
#: left_back_paw). Left/right follow the object's own side in both conventions.
PART_TO_SLOT = (2, 5, 8, 3, 11, 14, 4, 13)
DEFAULT_SPECIES = {"Felidae": ("cat", "lion"), "Canidae": ("dog",)}
_SUBDIRS = ("ImageAnnotation", "JPEGImages", "PairAnnotation")
_PREFIX = "data/ap-10k/ImageAnnotation"


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or ":" in name or name in (".", ".."):
        raise DitfError(f"make_ap10k_demo: bad family/species name {name!r}")


def make_ap10k_demo(
    root: Path | str,
    species: dict[str, tuple[str, ...]] | None = None,
    images_per_species: int = 3,
    cross_pairs: int = 2,
    image_size: tuple[int, int] = (160, 120),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny AP-10K benchmark (test, test_cross_species, test_cross_family) under `root`.

    `species` maps family -> species names (default: Felidae: cat, lion; Canidae: dog).
    Intra-species: every combination of a species' images. Cross-species: the first
    `cross_pairs` (image_i, image_j) products of each species combination within a family.
    Cross-family: the first `cross_pairs` products of each family combination. `root` must be
    empty or absent unless `overwrite`, which deletes only the three benchmark folders first.
    """
    root = Path(root)
    species = dict(DEFAULT_SPECIES if species is None else species)
    if images_per_species < 2 or cross_pairs < 1 or not species or not all(species.values()):
        raise DitfError("make_ap10k_demo: need >= 1 species per family, images_per_species >= 2, cross_pairs >= 1")
    for family, names in species.items():
        _check_name(family)
        for name in names:
            _check_name(name)
    if min(image_size) < 48:
        raise DitfError(f"make_ap10k_demo: image_size {image_size} too small (min side 48)")
    if root.exists() and not root.is_dir():
        raise DitfError(f"demo root {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DitfError(f"demo root {root} is not empty; pick a new folder or pass overwrite=True")
        for sub in _SUBDIRS:
            shutil.rmtree(root / sub, ignore_errors=True)

    image_id = 0
    by_species: dict[tuple[str, str], list[str]] = {}  # -> JSON paths as GeoAware writes them
    for family, names in species.items():
        for name in names:
            rng = np.random.default_rng([seed, zlib.crc32(f"ap10k:{family}/{name}".encode())])
            body = tuple(int(c) for c in rng.integers(60, 200, size=3))
            ann_dir = root / "ImageAnnotation" / family / name
            img_dir = root / "JPEGImages" / family / name
            ann_dir.mkdir(parents=True, exist_ok=True)
            img_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for i in range(images_per_species):
                factor = _SCALES[int(rng.integers(len(_SCALES)))] if i else 1.0
                width, height = (2 * round(side * factor / 2) for side in image_size)
                flip = i == 1 or (i > 1 and bool(rng.random() < 0.5))
                for _attempt in range(100):
                    canvas, kps, bbox, _trunc, _occ, _scale = _render(rng, body, width, height, flip)
                    if sum(k is not None for k in kps) >= _MIN_VISIBLE:
                        break
                else:  # pragma: no cover - the SPair demo's ranges make this unreachable
                    raise RuntimeError("demo generator could not place the object")
                image_id += 1
                stem = f"{image_id:012d}"
                canvas.save(img_dir / f"{stem}.jpg", format="JPEG", quality=95, subsampling=0)
                keypoints = [0] * (3 * NUM_KEYPOINTS)
                for part, point in enumerate(kps):
                    if point is not None:
                        slot = PART_TO_SLOT[part]
                        keypoints[3 * slot : 3 * slot + 3] = [point[0], point[1], 2]
                x1, y1, x2, y2 = bbox
                annotation = {  # COCO annotation fields, then the image record, then the category
                    "id": image_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1],
                    "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                    "iscrowd": 0,
                    "num_keypoints": sum(k is not None for k in kps),
                    "keypoints": keypoints,
                    "license": 1,
                    "file_name": f"{stem}.jpg",
                    "width": width,
                    "height": height,
                    "background": 1,
                    "name": name,
                    "supercategory": family,
                }
                (ann_dir / f"{stem}.json").write_text(json.dumps(annotation, indent=4), encoding="utf-8")
                paths.append(f"{_PREFIX}/{family}/{name}/{stem}.json")
            by_species[(family, name)] = paths

    def write(folder: str, pairs: list[tuple[str, str]], category: str) -> None:
        out = root / "PairAnnotation" / folder
        out.mkdir(parents=True, exist_ok=True)
        for src, trg in pairs:
            name = f"{Path(src).stem}-{Path(trg).stem}:{category}.json"
            data = {"src_json_path": src, "trg_json_path": trg}
            (out / name).write_text(json.dumps(data, indent=4), encoding="utf-8")

    for (family, name), paths in by_species.items():
        write("test", list(combinations(paths, 2)), name)
    for family, names in species.items():
        cross = []
        for a, b in combinations(names, 2):
            cross += list(product(by_species[(family, a)], by_species[(family, b)]))[:cross_pairs]
        if cross:
            write("test_cross_species", cross, family)
    families = list(species)
    cross = []
    for fa, fb in combinations(families, 2):
        left = [p for n in species[fa] for p in by_species[(fa, n)]]
        right = [p for n in species[fb] for p in by_species[(fb, n)]]
        cross += list(product(left, right))[:cross_pairs]
    (root / "PairAnnotation" / "test_cross_family").mkdir(parents=True, exist_ok=True)
    write("test_cross_family", cross, "all")
    (root / "PairAnnotation" / "test_cross_species").mkdir(parents=True, exist_ok=True)
    return root
