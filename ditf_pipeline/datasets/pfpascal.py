"""PF-Pascal reader, in the layout the public evaluations use (see docs/reproducing.md).

GeoAware-SC (``data/prepare_pfpascal.sh`` + ``utils/utils_dataset.py::load_pascal_data``), which
sd-dino and DiTF-era papers follow, keeps the weakalign pair lists next to the images::

    PF-dataset-PASCAL/                      <- pass this folder as the root ...
        JPEGImages/<voc_stem>.jpg           (flat: one folder for all 20 classes)
        Annotations/<class>/<voc_stem>.mat  (not needed here)
        test_pairs_pf_pascal.csv            (299 pairs)
        val_pairs_pf_pascal.csv
        trn_pairs_pf_pascal.csv | train_pairs_pf_pascal.csv

... or its parent (the weakalign / NCNet layout: ``proposal-flow-pascal/`` holding the CSVs,
or a ``PF-dataset-PASCAL/`` subfolder holding them). The CSV columns are, by position, as every
public loader reads them (``iloc[:, 0]``, ``[:, 1]``, ``[:, 2]``, ``[:, 3:5]``, ``[:, 5:7]``)::

    source_image, target_image, class, XA, YA, XB, YB

Image columns hold paths relative to the folder *above* ``PF-dataset-PASCAL`` (GeoAware opens
``f"{path}/../{name}"``), e.g. ``PF-dataset-PASCAL/JPEGImages/2009_002391.jpg``; we resolve them
inside the root (a leading ``PF-dataset-PASCAL/`` is dropped when the root is that folder) and
refuse absolute paths and ``..``. ``class`` is 1..20 in the PASCAL order of `CLASSES`. Each
coordinate column is a ``;``-separated list; XA/YA are the source points, XB/YB the target
points, row i of one matching row i of the other.

Decisions, each as GeoAware-SC ``load_pascal_data`` / ``pck_train.py::compute_pck`` does (DIFT
and DiTF publish no PF-Pascal evaluation; GeoAware's is the one DiT-feature papers reuse):

* coordinates are used exactly as stored: no 1-based (MATLAB) -> 0-based shift, no rounding;
* every listed point is used: the CSV lists only points annotated in both images, GeoAware
  pads to 20 with a mask that is 1 for all of them, so nothing is filtered (points are not even
  clipped to the image);
* PCK threshold = alpha * max(H, W) of the TARGET IMAGE (GeoAware: ``alpha * ANNO_SIZE`` in the
  840 frame the image's long side was resized to, i.e. the original long side), alphas
  0.05 / 0.10 / 0.15. Note DenseMatching's "scnet" procedure uses the *source* image instead.

Image sizes come from the image headers (`images.image_size`, EXIF orientation applied: the frame
`load_rgb` hands to the model), so unlike SPair-71k `pairs()` needs the images on disk.
The training list of weakalign (``source_image,target_image,class,flip``) has no keypoints
(GeoAware reads them from ``Annotations/*.mat``); it is refused with a message saying so.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ..core.errors import DitfError
from ..core.images import image_size
from . import register
from .base import Dataset, ImageRecord, Pair, check_pair_geometry

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
SPLITS = ("test", "val", "trn")
#: CSV file names tried for each split, in order.
CSV_NAMES = {
    "test": ("test_pairs_pf_pascal.csv",),
    "val": ("val_pairs_pf_pascal.csv",),
    "trn": ("trn_pairs_pf_pascal.csv", "train_pairs_pf_pascal.csv"),
}
#: The folder name the CSV paths start with.
PF_FOLDER = "PF-dataset-PASCAL"
COLUMNS = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")


def _coords(value: str, where: str, column: str) -> list[float]:
    items = value.split(";")
    out = []
    for item in items:
        item = item.strip()
        try:
            number = float(item)
        except ValueError:
            raise DitfError(
                f"{where}: column {column!r} must be ';'-separated numbers, got {value!r}"
            ) from None
        if not math.isfinite(number):
            raise DitfError(f"{where}: column {column!r} must hold finite numbers, got {value!r}")
        out.append(number)
    return out


def _relative_parts(value: str, where: str, column: str) -> tuple[str, ...]:
    """A relative POSIX path inside the dataset, as components; no '..', no absolute paths."""
    bad = (
        not value
        or "\x00" in value
        or "\\" in value
        or value.startswith("/")
        or (len(value) > 1 and value[1] == ":")
    )
    parts = tuple(value.split("/"))
    if bad or any(part in ("", ".", "..") for part in parts):
        raise DitfError(f"{where}: column {column!r} must be a relative path inside the dataset, got {value!r}")
    return parts


@register
class PFPascal(Dataset):
    """PF-Pascal, one split (default ``test``: 299 pairs in the public list)."""

    name = "pfpascal"
    exif_transpose = False  # annotations in the stored pixel orientation
    alphas = (0.05, 0.1, 0.15)
    threshold_rule = "alpha * max(H, W) of the target image (as GeoAware-SC load_pascal_data)"

    def __init__(self, root: Path | str, split: str | None = None, category: str | None = None) -> None:
        super().__init__(root, split or "test")
        if self.split not in SPLITS:
            raise DitfError(f"unknown PF-Pascal split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DitfError(f"PF-Pascal root {self.root} does not exist or is not a directory")
        if category is not None and category not in CLASSES:
            raise DitfError(f"unknown PF-Pascal category {category!r}; choose one of {', '.join(CLASSES)}")
        self.category = category
        self.csv_file = self._find_csv()
        self._pairs: list[Pair] | None = None
        self._paths: dict[str, Path] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}

    def _find_csv(self) -> Path:
        tried = []
        for folder in (self.root, self.root / PF_FOLDER):
            for name in CSV_NAMES[self.split]:
                path = folder / name
                if path.is_file():
                    return path
                tried.append(str(path))
        raise DitfError(
            f"{self.root} does not look like PF-Pascal ({self.split} split): none of {', '.join(tried)} exists"
        )

    def _image_path(self, parts: tuple[str, ...]) -> Path:
        """CSV paths are relative to the folder above PF-dataset-PASCAL: resolve inside the root."""
        if len(parts) > 1 and parts[0] == PF_FOLDER and not (self.root / PF_FOLDER).is_dir():
            parts = parts[1:]  # the root *is* PF-dataset-PASCAL (GeoAware layout)
        return self.root.joinpath(*parts)

    # -- parsing ------------------------------------------------------------------------------
    def _rows(self) -> list[tuple[int, list[str]]]:
        try:
            text = self.csv_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DitfError(f"cannot read PF-Pascal pair list {self.csv_file}: {exc}") from exc
        reader = csv.reader(text.splitlines())
        rows = []
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    rows.append((reader.line_num, [cell.strip() for cell in row]))
        except csv.Error as exc:
            raise DitfError(f"{self.csv_file}:{reader.line_num}: malformed CSV ({exc})") from exc
        if not rows:
            raise DitfError(f"{self.csv_file}: empty file (expected a header {','.join(COLUMNS)} and pairs)")
        lineno, header = rows[0]
        if len(header) < len(COLUMNS):
            hint = (
                " (weakalign's training list has no keypoints; GeoAware reads them from Annotations/*.mat, "
                "which this reader does not support)"
                if "flip" in (h.lower() for h in header)
                else ""
            )
            raise DitfError(
                f"{self.csv_file}:{lineno}: header has {len(header)} columns {header!r}; expected at least "
                f"{len(COLUMNS)}: {','.join(COLUMNS)}{hint}"
            )
        try:
            float(header[2])
        except ValueError:
            pass
        else:
            raise DitfError(
                f"{self.csv_file}:{lineno}: first line must be the header {','.join(COLUMNS)}, got {header!r}"
            )
        return rows[1:]

    def _parse_row(self, index: int, lineno: int, row: list[str]) -> Pair:
        where = f"{self.csv_file}:{lineno}"
        if len(row) < len(COLUMNS):
            raise DitfError(f"{where}: expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), got {len(row)}")
        src_parts = _relative_parts(row[0], where, "source_image")
        trg_parts = _relative_parts(row[1], where, "target_image")
        try:
            class_number = float(row[2])
        except ValueError:
            class_number = float("nan")
        if not (1 <= class_number <= 20 and class_number == int(class_number)):  # NaN fails too
            raise DitfError(f"{where}: column 'class' must be an integer 1..20, got {row[2]!r}")
        category = CLASSES[int(class_number) - 1]
        xa, ya = _coords(row[3], where, "XA"), _coords(row[4], where, "YA")
        xb, yb = _coords(row[5], where, "XB"), _coords(row[6], where, "YB")
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise DitfError(
                f"{where}: coordinate lists differ in length (XA {len(xa)}, YA {len(ya)}, XB {len(xb)}, YB {len(yb)})"
            )
        src_path, trg_path = self._image_path(src_parts), self._image_path(trg_parts)
        src_key, trg_key = f"{category}/{src_path.stem}", f"{category}/{trg_path.stem}"
        for key, path in ((src_key, src_path), (trg_key, trg_path)):
            if self._paths.setdefault(key, path) != path:
                raise DitfError(f"{where}: images {self._paths[key]} and {path} share the key {key!r}; rename one")
        sizes = []
        for path in (src_path, trg_path):
            if path not in self._sizes:  # images recur across pairs: read each header once
                if not path.is_file():
                    raise DitfError(f"missing image {path} (needed by {where})")
                self._sizes[path] = image_size(path, exif_transpose=self.exif_transpose)
            sizes.append(self._sizes[path])
        src_size, trg_size = sizes
        return Pair(
            pair_id=f"{index:04d}-{src_path.stem}-{trg_path.stem}:{category}",
            category=category,
            src_key=src_key,
            trg_key=trg_key,
            src_kps=np.column_stack([xa, ya]).astype(np.float64).reshape(len(xa), 2),
            trg_kps=np.column_stack([xb, yb]).astype(np.float64).reshape(len(xb), 2),
            src_size=src_size,
            trg_size=trg_size,
            threshold_base=float(max(trg_size)),
            trg_bbox=None,
            extra={
                "annotation": where,
                "class": int(class_number),
                "src_imname": row[0],
                "trg_imname": row[1],
                "src_path": str(src_path),
                "trg_path": str(trg_path),
            },
        )

    # -- Dataset API --------------------------------------------------------------------------
    def pairs(self) -> list[Pair]:
        """The split's pairs (optionally one class), in CSV order; parsed once.

        `pair_id` is ``<row>-<src_stem>-<trg_stem>:<class>`` with row = 1-based data row of the
        CSV, so ids stay unique even if a list repeats a pair.
        """
        if self._pairs is None:
            pairs = [self._parse_row(i, lineno, row) for i, (lineno, row) in enumerate(self._rows(), 1)]
            for pair in pairs:
                check_pair_geometry(pair)
            if not pairs:
                raise DitfError(f"no PF-Pascal {self.split} pairs in {self.csv_file}")
            if self.category is not None:
                pairs = [p for p in pairs if p.category == self.category]
                if not pairs:
                    raise DitfError(
                        f"no PF-Pascal {self.split} pairs for category {self.category!r} in {self.csv_file}"
                    )
            self._pairs = pairs
        return list(self._pairs)

    def images(self) -> list[ImageRecord]:
        """Distinct images of the split's pairs, sorted by key ``<class>/<voc_stem>``."""
        records: dict[str, ImageRecord] = {}
        for pair in self.pairs():
            for key, side in ((pair.src_key, "src"), (pair.trg_key, "trg")):
                if key not in records:
                    records[key] = ImageRecord(key=key, path=Path(pair.extra[f"{side}_path"]), category=pair.category)
        return [records[key] for key in sorted(records)]

    def category_of(self, key: str) -> str | None:
        """Class from the key itself: ``"cat/2009_002391" -> "cat"``."""
        keys = {k for p in self.pairs() for k in (p.src_key, p.trg_key)}
        return key.split("/", 1)[0] if key in keys else None
