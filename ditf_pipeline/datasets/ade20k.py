"""ADE20K (SceneParsing / ADEChallengeData2016) reader, in the dataset's real on-disk layout.

    images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg
    annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png     8-bit, one value per pixel

Annotation values: 0 = "other / unlabelled" (ignored), 1..150 = the 150 benchmark classes. As
mmseg's ``reduce_zero_label`` (what DINOv2's and DiTF's linear probes use), `load_label`
returns class indices 0..149 and `IGNORE_INDEX` (255) for 0.

Image keys are ``"<split>/<stem>"`` (``"validation/ADE_val_00000001"``), so both splits can be
extracted into the same store key without collisions. Annotation PNGs are decoded with PIL
only (never unpickled); keys handed to `load_label` are checked against the split's index, so
they can never name a file outside the dataset root.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import DitfError
from ..core.images import image_size
from . import register
from .base import Dataset, ImageRecord

SPLITS = ("training", "validation")
SPLIT_ALIASES = {"train": "training", "trn": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NUM_CLASSES = 150
IGNORE_INDEX = 255
#: The 150 SceneParsing classes, index 0..149 = annotation value 1..150 (mmseg's ADE20KDataset).
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip
assert len(CLASSES) == NUM_CLASSES

_LABEL_MODES = {"L", "P"}


def reduce_zero_label(values: np.ndarray) -> np.ndarray:
    """Annotation values 0..150 -> classes 0..149, 0 -> IGNORE_INDEX (uint8)."""
    values = np.asarray(values, dtype=np.uint8)
    return np.where(values == 0, IGNORE_INDEX, values.astype(np.int16) - 1).astype(np.uint8)


def read_label_png(path: Path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Raw annotation values (H, W) uint8 of one ADE20K PNG, validated (0..num_classes)."""
    if not path.is_file():
        raise DitfError(f"ADE20K annotation {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise DitfError(f"ADE20K annotation {path} is not a PNG (format {img.format})")
                if img.mode not in _LABEL_MODES:
                    raise DitfError(
                        f"ADE20K annotation {path} has mode {img.mode!r}; expected one 8-bit channel (L or P)"
                    )
                img.load()
                values = np.array(img, dtype=np.uint8)  # P: the palette indices are the labels
    except DitfError:
        raise
    except Exception as exc:
        raise DitfError(f"cannot read ADE20K annotation {path}: {type(exc).__name__}: {exc}") from exc
    if values.ndim != 2 or values.size == 0:
        raise DitfError(f"ADE20K annotation {path} has shape {values.shape}; expected (H, W)")
    top = int(values.max())
    if top > num_classes:
        raise DitfError(f"ADE20K annotation {path} holds value {top}; valid values are 0..{num_classes}")
    return values


@register
class ADE20K(Dataset):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, splits training / validation.

    ``images()`` lists the split's images (sorted by key) for the extractor; ``load_label(key)``
    returns the (H, W) uint8 class map of an image (0..149, 255 = ignore).
    """

    name = "ade20k"
    exif_transpose = False  # annotations in the stored pixel orientation
    task = "segmentation"
    alphas = ()
    threshold_rule = "none (semantic segmentation: mIoU over 150 classes, label 0 ignored)"
    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX
    class_names = CLASSES

    def __init__(self, root: Path | str, split: str | None = None) -> None:
        split = SPLIT_ALIASES.get(split, split) if split is not None else "validation"
        super().__init__(root, split)
        if self.split not in SPLITS:
            raise DitfError(f"unknown ADE20K split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DitfError(f"ADE20K root {self.root} does not exist or is not a directory")
        self.image_dir = self.root / "images" / self.split
        self.label_dir = self.root / "annotations" / self.split
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise DitfError(
                    f"{self.root} does not look like ADE20K (ADEChallengeData2016): {folder} is missing"
                )
        self._records: list[ImageRecord] | None = None
        self._by_key: dict[str, ImageRecord] = {}

    def images(self) -> list[ImageRecord]:
        """The split's images, sorted by key ``<split>/<stem>``; each must have its annotation."""
        if self._records is None:
            found: dict[str, Path] = {}
            for path in sorted(self.image_dir.iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                    continue
                key = f"{self.split}/{path.stem}"
                if key in found:
                    raise DitfError(f"two ADE20K images share the key {key!r}: {found[key]} and {path}; remove one")
                label = self.label_dir / f"{path.stem}.png"
                if not label.is_file():
                    raise DitfError(f"missing ADE20K annotation {label} (for image {path})")
                found[key] = path
            if not found:
                raise DitfError(f"no ADE20K images (.jpg) found in {self.image_dir}")
            self._records = [ImageRecord(key=key, path=found[key], category=None) for key in sorted(found)]
            self._by_key = {record.key: record for record in self._records}
        return list(self._records)

    def category_of(self, key: str) -> str | None:
        return None  # scene images: no object category (use --prompt none or captions)

    def label_path(self, key: str) -> Path:
        """The annotation PNG of an image key of this split (keys outside the split are refused)."""
        self.images()
        record = self._by_key.get(key)
        if record is None:
            raise DitfError(f"{key!r} is not an image of the ADE20K {self.split} split under {self.root}")
        return self.label_dir / f"{record.path.stem}.png"

    def load_label(self, key: str) -> np.ndarray:
        """(H, W) uint8 class map of image `key`: 0..149, `IGNORE_INDEX` where unlabelled.

        The annotation must have the size of its image (as displayed); anything else is an
        error naming both files.
        """
        path = self.label_path(key)
        labels = reduce_zero_label(read_label_png(path, self.num_classes))
        width, height = image_size(self._by_key[key].path, exif_transpose=self.exif_transpose)
        if labels.shape != (height, width):
            raise DitfError(
                f"ADE20K annotation {path} is {labels.shape[1]}x{labels.shape[0]} but its image "
                f"{self._by_key[key].path} is {width}x{height}"
            )
        return labels
