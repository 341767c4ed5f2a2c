"""AP-10K correspondence benchmark reader, in the layout GeoAware-SC builds (docs/reproducing.md).

GeoAware-SC's ``prepare_ap10k.ipynb`` turns the AP-10K pose dataset into::

    ImageAnnotation/<family>/<species>/<id:012d>.json   one COCO annotation merged with its image
                                                         record: bbox [x, y, w, h], keypoints
                                                         (17 x [x, y, v], v in {0, 2}),
                                                         num_keypoints, width, height, file_name,
                                                         id, image_id, category_id, name
                                                         (species), supercategory (family), ...
    JPEGImages/<family>/<species>/<id:012d>.jpg
    PairAnnotation/<folder>/<src_id>-<trg_id>:<category>.json
                                                         {"src_json_path": ..., "trg_json_path": ...}

with folders ``test`` (intra-species, category = species), ``test_cross_species`` (category =
family) and ``test_cross_family`` (category = ``all``), plus ``val*`` and ``trn`` variants.
Pass the ``ap-10k`` folder as the root. Splits: ``intra-species`` (default), ``cross-species``,
``cross-family`` (GeoAware's ``--AP10K_EVAL_SUBSET`` names) or a folder name from `FOLDERS`.

The JSON paths inside pair files are whatever the notebook wrote, relative to GeoAware's
checkout (``data/ap-10k/ImageAnnotation/Felidae/cat/000000012345.json``). Only the part after
the last ``ImageAnnotation`` component is used, and it must be exactly ``<family>/<species>/
<file>.json`` with plain names: it is rebuilt under *our* root, so nothing read from a pair file
can point outside the dataset. The image is the JSON path with ``ImageAnnotation`` ->
``JPEGImages`` and ``.json`` -> ``.jpg`` (GeoAware's ``load_ap10k_data`` rule).

Decisions, as GeoAware-SC ``utils/utils_dataset.py::load_ap10k_data`` + ``pck_train.py``:

* keypoints used = those with visibility > 0 in both images (GeoAware divides v by 2 and keeps
  ``src_v * trg_v > 0``), in AP-10K keypoint order; coordinates as stored;
* threshold = alpha * max(w, h) of the target bbox ``[x, y, w, h]`` (no x2 - x1 arithmetic),
  alphas 0.01 / 0.05 / 0.10;
* the paper reports AP-10K per image (mean over pairs of each pair's fraction): see
  `primary_aggregation`;
* all pairs of the folder are read (GeoAware samples 20 per category by default, TEST_SAMPLE).

Image sizes come from the annotation (``width``/``height``), so `pairs()` needs no images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DitfError
from . import register
from .base import Dataset, ImageRecord, Pair, check_pair_geometry, load_json_object

#: ``--split`` names (GeoAware's AP10K_EVAL_SUBSET) -> PairAnnotation folder.
SPLITS = {"intra-species": "test", "cross-species": "test_cross_species", "cross-family": "test_cross_family"}
#: PairAnnotation folders that may also be named directly.
FOLDERS = ("test", "test_cross_species", "test_cross_family", "val", "val_cross_species", "val_cross_family", "trn")
NUM_KEYPOINTS = 17
KEYPOINT_NAMES = (
    "left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow",
    "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee",
    "left_back_paw", "right_hip", "right_knee", "right_back_paw",
)  # fmt: skip
#: Image-annotation fields copied into `Pair.extra` (as ``src_<field>`` / ``trg_<field>``).
EXTRA_IMAGE_FIELDS = ("id", "image_id", "file_name", "name", "supercategory", "num_keypoints")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_json(path: Path, what: str) -> dict:
    return load_json_object(path, f"AP-10K {what}")


def _plain_name(name: str) -> bool:
    return bool(name.strip()) and name not in (".", "..") and "\x00" not in name and ":" not in name


class _ImageAnnotation:
    """One parsed ImageAnnotation JSON (validated once, shared by every pair using it)."""

    def __init__(self, path: Path, family: str, species: str) -> None:
        self.path, self.family, self.species = path, family, species
        self.data = _load_json(path, "image annotation")
        self.size = (self._positive_int("width"), self._positive_int("height"))
        bbox = self._get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise self.error("bbox", f"must be [x, y, w, h] with finite numbers, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0 or max(w, h) <= 0:
            raise self.error("bbox", f"must have a positive width or height, got {bbox!r}")
        self.bbox = (x, y, w, h)
        kps = self._get("keypoints")
        if (
            not isinstance(kps, list)
            or len(kps) != 3 * NUM_KEYPOINTS
            or not all(_is_number(v) for v in kps)
        ):
            raise self.error("keypoints", f"must be a flat list of {3 * NUM_KEYPOINTS} finite numbers (17 x [x, y, v])")
        self.keypoints = np.asarray(kps, dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
        if (self.keypoints[:, 2] < 0).any():
            raise self.error("keypoints", "has a negative visibility flag")
        self.key = f"{family}/{species}/{path.stem}"

    def error(self, field: str, problem: str) -> DitfError:
        return DitfError(f"{self.path}: field {field!r} {problem}")

    def _get(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, "is missing")
        return self.data[field]

    def _positive_int(self, field: str) -> int:
        value = self._get(field)
        if not _is_number(value) or value <= 0 or value != int(value):
            raise self.error(field, f"must be a positive integer, got {value!r}")
        return int(value)


@register
class AP10K(Dataset):
    """AP-10K correspondence benchmark (GeoAware-SC), one split (default ``intra-species``)."""

    name = "ap10k"
    exif_transpose = False  # annotations in the stored pixel orientation
    alphas = (0.01, 0.05, 0.1)
    threshold_rule = "alpha * max(w, h) of the target bbox [x, y, w, h] (as GeoAware-SC load_ap10k_data)"
    #: the aggregation the benchmark's paper reports (GeoAware-SC Table: per image)
    primary_aggregation = "per_image"

    def __init__(self, root: Path | str, split: str | None = None, category: str | None = None) -> None:
        super().__init__(root, split or "intra-species")
        if self.split in SPLITS:
            self.folder = SPLITS[self.split]
        elif self.split in FOLDERS:
            self.folder = self.split
        else:
            raise DitfError(
                f"unknown AP-10K split {self.split!r}; choose one of {', '.join(SPLITS)} "
                f"(or a PairAnnotation folder: {', '.join(FOLDERS)})"
            )
        if not self.root.is_dir():
            raise DitfError(f"AP-10K root {self.root} does not exist or is not a directory")
        self.pair_dir = self.root / "PairAnnotation" / self.folder
        if not self.pair_dir.is_dir():
            raise DitfError(f"{self.root} does not look like the AP-10K benchmark: {self.pair_dir} does not exist")
        self.category = category
        self._pairs: list[Pair] | None = None
        self._annotations: dict[Path, _ImageAnnotation] = {}

    # -- paths --------------------------------------------------------------------------------
    def _annotation_path(self, pair_file: Path, field: str, value: Any) -> tuple[Path, str, str]:
        """``.../ImageAnnotation/<family>/<species>/<file>.json`` -> path under our root."""
        if not isinstance(value, str) or not value.strip():
            raise DitfError(f"{pair_file}: field {field!r} must be a non-empty string, got {value!r}")
        parts = value.replace("\\", "/").split("/")
        if "ImageAnnotation" not in parts:
            raise DitfError(
                f"{pair_file}: field {field!r} must be a path .../ImageAnnotation/<family>/<species>/<id>.json, "
                f"got {value!r}"
            )
        tail = parts[len(parts) - 1 - parts[::-1].index("ImageAnnotation") + 1 :]
        if len(tail) != 3 or not all(_plain_name(p) for p in tail) or not tail[2].endswith(".json"):
            raise DitfError(
                f"{pair_file}: field {field!r} must be a path .../ImageAnnotation/<family>/<species>/<id>.json "
                f"inside the dataset, got {value!r}"
            )
        family, species, filename = tail
        return self.root / "ImageAnnotation" / family / species / filename, family, species

    def _annotation(self, pair_file: Path, field: str, value: Any) -> _ImageAnnotation:
        path, family, species = self._annotation_path(pair_file, field, value)
        if path not in self._annotations:
            if not path.is_file():
                raise DitfError(
                    f"AP-10K image annotation {path} does not exist (named by {pair_file}, field {field!r})"
                )
            self._annotations[path] = _ImageAnnotation(path, family, species)
        return self._annotations[path]

    def image_path(self, ann: _ImageAnnotation) -> Path:
        return self.root / "JPEGImages" / ann.family / ann.species / f"{ann.path.stem}.jpg"

    # -- parsing ------------------------------------------------------------------------------
    def _parse_pair(self, path: Path) -> Pair:
        data = _load_json(path, "pair annotation")
        if ":" not in path.stem:
            raise DitfError(f"{path}: pair file name must end in ':<category>.json' (GeoAware naming)")
        category = path.stem.rsplit(":", 1)[1]
        if not category:
            raise DitfError(f"{path}: empty category after ':' in the file name")
        for field in ("src_json_path", "trg_json_path"):
            if field not in data:
                raise DitfError(f"{path}: field {field!r} is missing")
        src = self._annotation(path, "src_json_path", data["src_json_path"])
        trg = self._annotation(path, "trg_json_path", data["trg_json_path"])
        used = np.flatnonzero((src.keypoints[:, 2] > 0) & (trg.keypoints[:, 2] > 0))
        if used.size == 0:
            raise DitfError(f"{path}: no keypoint is visible in both {src.path.name} and {trg.path.name}")
        x, y, w, h = trg.bbox
        extra: dict[str, Any] = {
            "annotation": str(path),
            "kps_ids": [str(int(i)) for i in used],
            "src_bbox": list(src.bbox),
            "trg_bbox_xywh": list(trg.bbox),
            "src_family": src.family,
            "src_species": src.species,
            "trg_family": trg.family,
            "trg_species": trg.species,
            "src_json": str(src.path),
            "trg_json": str(trg.path),
        }
        for side, ann in (("src", src), ("trg", trg)):
            for field in EXTRA_IMAGE_FIELDS:
                if field in ann.data:
                    extra[f"{side}_{field}"] = ann.data[field]
        return Pair(
            pair_id=path.stem,
            category=category,
            src_key=src.key,
            trg_key=trg.key,
            src_kps=src.keypoints[used, :2].copy(),
            trg_kps=trg.keypoints[used, :2].copy(),
            src_size=src.size,
            trg_size=trg.size,
            threshold_base=float(max(w, h)),
            trg_bbox=(x, y, x + w, y + h),
            extra=extra,
        )

    # -- Dataset API --------------------------------------------------------------------------
    def pairs(self) -> list[Pair]:
        """The split's pairs (optionally one file-name category), sorted by file name; parsed once."""
        if self._pairs is None:
            files = sorted(self.pair_dir.glob("*.json"))
            if self.category is not None:
                files = [p for p in files if p.stem.rsplit(":", 1)[-1] == self.category]
                if not files:
                    raise DitfError(f"no AP-10K {self.folder} pairs for category {self.category!r} under {self.root}")
            if not files:
                raise DitfError(f"no AP-10K {self.folder} pairs found in {self.pair_dir}")
            self._pairs = [self._parse_pair(path) for path in files]
            for pair in self._pairs:
                check_pair_geometry(pair)
        return list(self._pairs)

    def images(self) -> list[ImageRecord]:
        """Distinct images of the split, sorted by key ``<family>/<species>/<id>``; category = species."""
        self.pairs()
        records = {}
        for ann in self._annotations.values():
            path = self.image_path(ann)
            if not path.is_file():
                raise DitfError(f"missing image {path} (annotation {ann.path})")
            records[ann.key] = ImageRecord(key=ann.key, path=path, category=ann.species)
        return [records[key] for key in sorted(records)]

    def category_of(self, key: str) -> str | None:
        """Species from the key itself: ``"Felidae/cat/000000012345" -> "cat"``."""
        self.pairs()
        keys = {ann.key for ann in self._annotations.values()}
        return key.split("/")[1] if key in keys else None
