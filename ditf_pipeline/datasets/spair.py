"""SPair-71k reader, in the dataset's real on-disk layout (see docs/reproducing.md).

    JPEGImages/<category>/<imname>.jpg
    PairAnnotation/{trn,val,test}/<pairid>-<src_stem>-<trg_stem>:<category>.json
    Layout/large/{trn,val,test}.txt        (pair file names without .json)

Only the pair JSONs are needed: they carry image names, sizes, bboxes and the keypoints visible
in both images. Annotation files are untrusted input: they are parsed with `json` only, every
field is type-checked, and names taken from them can never point outside the dataset root.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DitfError
from . import register
from .base import Dataset, ImageRecord, Pair, check_pair_geometry, load_json_object

SPLITS = ("trn", "val", "test")
CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)  # fmt: skip
#: Pair-level fields copied verbatim into `Pair.extra` when present.
EXTRA_FIELDS = (
    "pair_id", "kps_ids", "mirror", "viewpoint_variation", "scale_variation", "truncation",
    "occlusion", "src_bndbox", "src_imname", "trg_imname",
)  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _PairFile:
    """Field accessors that name the file and the field in every error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = load_json_object(path, "SPair-71k pair annotation")

    def error(self, field: str, problem: str) -> DitfError:
        return DitfError(f"{self.path}: field {field!r} {problem}")

    def get(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, "is missing")
        return self.data[field]

    def name(self, field: str) -> str:
        """A single path component (image or category name): no separators, no '..'."""
        value = self.get(field)
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, f"must be a non-empty string, got {value!r}")
        if "/" in value or "\\" in value or value in (".", "..") or "\x00" in value or ":" in value:
            raise self.error(field, f"must be a plain file name inside the dataset, got {value!r}")
        return value

    def numbers(self, field: str, min_len: int, max_len: int | None = None) -> list[float]:
        value = self.get(field)
        max_len = min_len if max_len is None else max_len
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            want = f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}"
            raise self.error(field, f"must be a list of {want} numbers, got {value!r}")
        if not all(_is_number(v) for v in value):
            raise self.error(field, f"must contain only finite numbers, got {value!r}")
        return [float(v) for v in value]

    def imsize(self, field: str) -> tuple[int, int]:
        """[W, H] or [W, H, C] -> (W, H), positive integers."""
        values = self.numbers(field, 2, 3)
        if not all(v > 0 and v == int(v) for v in values):
            raise self.error(field, f"must hold positive integers [W, H, C], got {self.data[field]!r}")
        return int(values[0]), int(values[1])

    def keypoints(self, field: str) -> np.ndarray:
        value = self.get(field)
        if not isinstance(value, list):
            raise self.error(field, f"must be a list of [x, y] pairs, got {type(value).__name__}")
        for i, point in enumerate(value):
            if not isinstance(point, list) or len(point) != 2 or not all(_is_number(v) for v in point):
                raise self.error(field, f"entry {i} must be [x, y] with finite numbers, got {point!r}")
        return np.asarray(value, dtype=np.float64).reshape(len(value), 2)


@register
class SPair71k(Dataset):
    """SPair-71k, one split (default ``test``: 12,234 pairs over 481 images in the full set)."""

    name = "spair"
    exif_transpose = False  # annotations in the stored pixel orientation
    alphas = (0.01, 0.05, 0.1)
    threshold_rule = "alpha * max(x2 - x1, y2 - y1) of the target bbox (as DIFT/DiTF eval_spair.py)"

    def __init__(self, root: Path | str, split: str | None = None, category: str | None = None) -> None:
        super().__init__(root, split or "test")
        if self.split not in SPLITS:
            raise DitfError(f"unknown SPair-71k split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DitfError(f"SPair-71k root {self.root} does not exist or is not a directory")
        self.category = category
        self.layout_file = self.root / "Layout" / "large" / f"{self.split}.txt"
        self.pair_dir = self.root / "PairAnnotation" / self.split
        if not self.layout_file.is_file() and not self.pair_dir.is_dir():
            raise DitfError(
                f"{self.root} does not look like SPair-71k: neither {self.layout_file} nor "
                f"{self.pair_dir} exists"
            )
        self._pairs: list[Pair] | None = None

    # -- pair files ---------------------------------------------------------------------------
    def _pair_files(self) -> list[Path]:
        """The split's pair JSONs: listed by the layout file when present, else globbed."""
        if not self.layout_file.is_file():
            return sorted(self.pair_dir.glob("*.json"))
        try:
            lines = self.layout_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DitfError(f"cannot read SPair-71k layout file {self.layout_file}: {exc}") from exc
        files = []
        for lineno, line in enumerate(lines, 1):
            stem = line.strip()
            if not stem:
                continue
            stem = stem.removesuffix(".json")
            if "/" in stem or "\\" in stem or stem in (".", "..") or "\x00" in stem:
                raise DitfError(f"{self.layout_file}:{lineno}: pair name {stem!r} must be a plain file name")
            path = self.pair_dir / f"{stem}.json"
            if not path.is_file():
                raise DitfError(f"{self.layout_file}:{lineno}: pair annotation {path} does not exist")
            files.append(path)
        return files

    def _parse_pair(self, path: Path) -> Pair:
        f = _PairFile(path)
        category = f.name("category")
        src_name, trg_name = f.name("src_imname"), f.name("trg_imname")
        src_size, trg_size = f.imsize("src_imsize"), f.imsize("trg_imsize")
        x1, y1, x2, y2 = f.numbers("trg_bndbox", 4)
        threshold = max(x2 - x1, y2 - y1)  # exactly DIFT's eval_spair.py rule, no +1
        if threshold <= 0:
            raise f.error("trg_bndbox", f"has no extent (x2 <= x1 and y2 <= y1): {f.data['trg_bndbox']!r}")
        if "src_bndbox" in f.data:
            f.numbers("src_bndbox", 4)
        src_kps, trg_kps = f.keypoints("src_kps"), f.keypoints("trg_kps")
        if len(src_kps) != len(trg_kps):
            raise f.error("trg_kps", f"has {len(trg_kps)} keypoints but src_kps has {len(src_kps)}")
        if len(src_kps) == 0:
            raise f.error("src_kps", "is empty (a pair needs at least one keypoint)")
        kps_ids = f.data.get("kps_ids")
        if kps_ids is not None and (not isinstance(kps_ids, list) or len(kps_ids) != len(src_kps)):
            raise f.error("kps_ids", f"must be a list of {len(src_kps)} ids, got {kps_ids!r}")
        extra = {key: f.data[key] for key in EXTRA_FIELDS if key in f.data}
        extra["annotation"] = str(path)
        pair = Pair(
            pair_id=path.stem,
            category=category,
            src_key=f"{category}/{Path(src_name).stem}",
            trg_key=f"{category}/{Path(trg_name).stem}",
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_size=src_size,
            trg_size=trg_size,
            threshold_base=float(threshold),
            trg_bbox=(x1, y1, x2, y2),
            extra=extra,
        )
        check_pair_geometry(pair, str(path))
        return pair

    # -- Dataset API --------------------------------------------------------------------------
    def pairs(self) -> list[Pair]:
        """The split's pairs (optionally one category), in layout-file order; parsed once."""
        if self._pairs is None:
            files = self._pair_files()
            if self.category is not None:
                # File names end in ":<category>"; filter before parsing 12k JSONs needlessly.
                files = [p for p in files if p.stem.rsplit(":", 1)[-1] == self.category]
            pairs = [self._parse_pair(path) for path in files]
            if self.category is not None:
                pairs = [p for p in pairs if p.category == self.category]
                if not pairs:
                    raise DitfError(
                        f"no SPair-71k {self.split} pairs for category {self.category!r} under {self.root}"
                    )
            if not pairs:
                raise DitfError(f"no SPair-71k {self.split} pairs found under {self.root}")
            self._pairs = pairs
        return list(self._pairs)

    def _image_path(self, category: str, imname: str, pair: Pair) -> Path:
        cat_dir = self.root / "JPEGImages" / category
        if not cat_dir.is_dir():
            raise DitfError(
                f"missing category folder {cat_dir} (needed by {pair.extra.get('annotation', pair.pair_id)})"
            )
        # `category` and `imname` were checked to be single path components (no separators, no
        # ".."), so the path is lexically inside the root. Symlinks the user placed on purpose
        # (JPEGImages -> another disk) are followed, not rejected.
        path = cat_dir / imname
        if not path.is_file():
            raise DitfError(f"missing image {path} (needed by {pair.extra.get('annotation', pair.pair_id)})")
        return path

    def images(self) -> list[ImageRecord]:
        """Distinct images of the split's pairs, sorted by key ``<category>/<imstem>``."""
        records: dict[str, ImageRecord] = {}
        for pair in self.pairs():
            for key, imname in ((pair.src_key, pair.extra["src_imname"]), (pair.trg_key, pair.extra["trg_imname"])):
                if key not in records:
                    path = self._image_path(pair.category, imname, pair)
                    records[key] = ImageRecord(key=key, path=path, category=pair.category)
        return [records[key] for key in sorted(records)]

    def category_of(self, key: str) -> str | None:
        """Category from the key itself (no image listing needed): ``"cat/img" -> "cat"``."""
        keys = {k for p in self.pairs() for k in (p.src_key, p.trg_key)}
        return key.split("/", 1)[0] if key in keys else None
