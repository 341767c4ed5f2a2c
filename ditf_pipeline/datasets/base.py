"""What every dataset reader hands to the rest of the pipeline.

Readers parse the benchmark's own on-disk layout and return plain records; nothing downstream
knows where a dataset came from. Readers import neither torch nor zarr, so the scorer can use
them on a machine with no DiT and no GPU.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import DitfError
from ..core.images import image_size


def load_json_object(path: Path, what: str) -> dict:
    """A JSON object from an annotation file, or one `DitfError` line naming the file.

    Annotations are data: parsed with `json` only, never evaluated or unpickled.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DitfError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DitfError(f"cannot read {what} {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DitfError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DitfError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_pair_geometry(pair: "Pair", where: str | None = None) -> None:
    """Keypoints inside their images and boxes with x1 < x2, y1 < y2 inside the target image.

    An annotation that breaks this is wrong for the image at hand (another file, a resized copy,
    swapped fields): matching would run and every PCK built on it would be silently wrong.
    """
    where = where or pair.extra.get("annotation", pair.pair_id)
    for side, kps, (width, height) in (("source", pair.src_kps, pair.src_size), ("target", pair.trg_kps, pair.trg_size)):
        outside = np.flatnonzero((kps[:, 0] < 0) | (kps[:, 0] > width) | (kps[:, 1] < 0) | (kps[:, 1] > height))
        if outside.size:
            x, y = kps[outside[0]]
            raise DitfError(f"{where}: {side} keypoint {int(outside[0])} ({x:g}, {y:g}) lies outside the "
                            f"{width}x{height} {side} image")
    boxes = [("target box", pair.trg_bbox, pair.trg_size)]
    if isinstance(pair.extra.get("src_bndbox"), list) and len(pair.extra["src_bndbox"]) == 4:
        boxes.append(("source box", tuple(pair.extra["src_bndbox"]), pair.src_size))
    for name, box, (width, height) in boxes:
        if box is None:
            continue
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            raise DitfError(f"{where}: {name} {list(box)} needs x1 < x2 and y1 < y2")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise DitfError(f"{where}: {name} {list(box)} lies outside the {width}x{height} image")


def check_annotated_sizes(pairs: "list[Pair]", records: "list[ImageRecord]", sizes: "list[tuple[int, int]]") -> None:
    """The size an annotation states for an image must be the size of the decoded file.

    Keypoints and PCK thresholds are in the annotated frame: a file of another size (a resized
    copy, the wrong image) would be scored silently wrong, so it is refused, naming both files.
    """
    actual = {record.key: (record.path, size) for record, size in zip(records, sizes)}
    for pair in pairs:
        for key, stated in ((pair.src_key, pair.src_size), (pair.trg_key, pair.trg_size)):
            if key in actual and tuple(actual[key][1]) != tuple(stated):
                path, (width, height) = actual[key]
                raise DitfError(
                    f"image {path} is {width}x{height} but {pair.extra.get('annotation', pair.pair_id)} says "
                    f"{stated[0]}x{stated[1]}: use the benchmark's original images"
                )


@dataclass(frozen=True)
class ImageRecord:
    """One image the extractor must run through the DiT.

    `key` is unique within the dataset and stable across runs (it is the row label in the
    store), e.g. ``"aeroplane/2008_000033"`` for SPair-71k.
    """

    key: str
    path: Path
    category: str | None = None
    #: the image's own prompt text (`--prompt per-image`: the Python API's per-image prompts)
    prompt: str | None = None


@dataclass(frozen=True)
class Pair:
    """One annotated correspondence pair, in original pixel coordinates.

    Keypoints are float arrays of shape (N, 2) holding (x, y); row i of `src_kps` corresponds to
    row i of `trg_kps`. `threshold_base` is the length alpha multiplies for PCK (max side of
    the target bbox for SPair-71k / AP-10K, of the target image for PF-Pascal).
    """

    pair_id: str
    category: str
    src_key: str
    trg_key: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_size: tuple[int, int]  # (width, height) of the original source image
    trg_size: tuple[int, int]  # (width, height) of the original target image
    threshold_base: float
    trg_bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2
    extra: dict = field(default_factory=dict, compare=False)


class Dataset(ABC):
    """A benchmark split: the images to extract and, for correspondence sets, the pairs to score."""

    #: registry name (``--dataset``)
    name: str = ""
    #: what the benchmark evaluates: "pairs" (keypoint PCK through `pairs()`), "video" (mask
    #: propagation, DAVIS), "homography" (HPatches); the match and score stages dispatch on it
    task: str = "pairs"
    #: paper defaults that override the model's (e.g. DAVIS: k=24, t=90, ensemble 1)
    defaults: dict = {}
    #: PCK alphas the benchmark reports by default
    alphas: tuple[float, ...] = (0.01, 0.05, 0.1)
    #: human-readable rule for the PCK threshold, printed with every score
    threshold_rule: str = ""
    #: the aggregation the benchmark's papers report (comparison tables default to it)
    primary_aggregation: str = "per_point"
    #: whether pixels are read with the EXIF orientation tag applied, as a viewer shows them
    #: (photos: a folder, the API's images). The annotated benchmarks say no: their keypoints,
    #: boxes, masks and sizes are in the stored pixel orientation, and the authors read the
    #: files with plain PIL, which ignores the tag.
    exif_transpose: bool = True

    def __init__(self, root: Path | str, split: str | None = None) -> None:
        self.root = Path(root)
        self.split = split

    @abstractmethod
    def images(self) -> list[ImageRecord]:
        """All images the split needs, in a deterministic order."""

    def pairs(self) -> list[Pair]:
        """Annotated pairs of the split (empty for unannotated image folders)."""
        return []

    def image_sizes(self, records: Sequence[ImageRecord]) -> list[tuple[int, int]]:
        """(width, height) of each record's image as this dataset reads it (headers only)."""
        return [image_size(record.path, exif_transpose=self.exif_transpose) for record in records]

    def check_annotations(self) -> None:
        """Refuse pair annotations that do not fit the images on disk, as extract does: every
        pair's category and images present, every stated image size the file's (keypoints
        inside their images are checked as the pairs are parsed). For commands that read only
        annotations (score): numbers computed on an annotation extract would refuse are wrong.
        """
        if self.task != "pairs":
            return
        records = self.images()
        check_annotated_sizes(self.pairs(), records, self.image_sizes(records))

    def category_of(self, key: str) -> str | None:
        """Category of an image, used to build the per-image prompt."""
        for record in self.images():
            if record.key == key:
                return record.category
        return None
