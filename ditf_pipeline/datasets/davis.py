"""DAVIS-2017 reader (semi-supervised video object segmentation), in the dataset's real layout.

    JPEGImages/<resolution>/<seq>/<frame>.jpg      (resolution "480p" by default)
    Annotations/<resolution>/<seq>/<frame>.png     indexed PNG: 0 background, 1..n objects
    ImageSets/2017/<split>.txt                     one sequence name per line (val: 30 sequences)

Frames of a sequence are the sorted ``*.jpg`` file names (as DINO's ``read_frame_list`` and the
davis2017-evaluation ``DAVIS`` class do); the first frame's annotation is the propagation seed
and the rest are ground truth for the scorer. Sequence names come from a text file and are
untrusted: each must be a single path component, so nothing can point outside the root.

Mask files are read with PIL only (no pickle); this module imports neither torch nor zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ..core.errors import DitfError
from . import register
from .base import Dataset, ImageRecord

SPLITS = ("val", "train")
RESOLUTIONS = ("480p", "Full-Resolution")
#: label davis2017-evaluation maps to background in ground-truth masks
VOID_LABEL = 255


def davis_palette() -> np.ndarray:
    """The DAVIS / PASCAL-VOC colour map as a (256, 3) uint8 array (index 1 = (128, 0, 0))."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def read_mask(path: Path | str, with_palette: bool = False):
    """An annotation / result PNG as a (H, W) uint8 label array (and its (256, 3) palette).

    Accepts indexed ("P") and 8-bit grey ("L") PNGs, the two forms DAVIS tools write; the label
    of a pixel is its palette index / grey value, exactly what ``np.array(Image.open(p))``
    gives in davis2017-evaluation. The palette falls back to `davis_palette` for "L" files.
    """
    path = Path(path)
    if not path.is_file():
        raise DitfError(f"DAVIS mask {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DitfError(f"DAVIS mask {path}: expected an indexed (P) or grey (L) PNG, got mode {img.mode}")
            labels = np.array(img, dtype=np.uint8)
            raw_palette = img.getpalette() if img.mode == "P" else None
    except DitfError:
        raise
    except Exception as exc:
        raise DitfError(f"cannot read DAVIS mask {path}: {type(exc).__name__}: {exc}") from exc
    if not with_palette:
        return labels
    palette = davis_palette()
    if raw_palette:
        entries = np.asarray(raw_palette, dtype=np.uint8)[: 256 * 3]
        entries = entries[: len(entries) // 3 * 3].reshape(-1, 3)
        palette[: len(entries)] = entries
    return labels, palette


def write_mask(path: Path | str, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save a (H, W) label array as an indexed PNG (DINO's ``imwrite_indexed``)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DitfError(f"write_mask {path}: labels must be 2-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DitfError(f"write_mask {path}: labels must lie in 0..255")
    img = Image.fromarray(labels.astype(np.uint8))
    img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    img.save(path, format="PNG")


@dataclass(frozen=True)
class VideoSequence:
    """One DAVIS sequence: frames in temporal order and the paths of their annotations.

    `gt_masks[i]` is the annotation of `frames[i]` (None when the file is absent; only the first
    frame's annotation is needed to propagate, all of them to score). `frame_names` are the
    frame file stems, which are also the result PNG names (``<out>/<seq>/<stem>.png``).
    """

    name: str
    frames: tuple[ImageRecord, ...]
    first_mask: Path
    gt_masks: tuple[Path | None, ...]

    @property
    def frame_names(self) -> list[str]:
        return [record.path.stem for record in self.frames]

    def __len__(self) -> int:
        return len(self.frames)


def _plain_name(name: str, where: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name or name != name.strip():
        raise DitfError(f"{where}: sequence name {name!r} must be a plain folder name")
    return name


@register
class Davis2017(Dataset):
    """DAVIS-2017 semi-supervised, one split (default ``val``: 30 sequences, 1,999 frames)."""

    name = "davis"
    exif_transpose = False  # annotations in the stored pixel orientation
    task = "video"
    alphas = ()
    threshold_rule = "J (IoU) and F (boundary, tolerance 0.008 x image diagonal), davis2017-evaluation"
    #: DiTF's DAVIS settings (eval_davis.sh / eval_davis.py of the public code)
    defaults: ClassVar[dict] = {
        "k": 24,
        "t": 90,
        "ensemble_size": 1,
        "channel_discard": True,
        "prompt": "a photo of a image",
        "img_size": 960,
        "resize": "short",  # short side -> img_size, long side floored to a multiple of 32
        "size_multiple": 32,
        "resample": "cv2-bilinear",  # read_frame: cv2.imread (BGR), cv2.resize INTER_LINEAR, then RGB
        "temperature": 0.1,
        "topk": 5,
        "n_last": 7,
        "radius": 12,
    }

    def __init__(
        self,
        root: Path | str,
        split: str | None = None,
        resolution: str = "480p",
        sequences: list[str] | tuple[str, ...] | str | None = None,
    ) -> None:
        super().__init__(root, split or "val")
        if self.split not in SPLITS:
            raise DitfError(f"unknown DAVIS-2017 split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if resolution not in RESOLUTIONS:
            raise DitfError(f"unknown DAVIS resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
        if not self.root.is_dir():
            raise DitfError(f"DAVIS root {self.root} does not exist or is not a directory")
        self.resolution = resolution
        self.image_dir = self.root / "JPEGImages" / resolution
        self.mask_dir = self.root / "Annotations" / resolution
        self.list_file = self.root / "ImageSets" / "2017" / f"{self.split}.txt"
        for needed in (self.image_dir, self.mask_dir):
            if not needed.is_dir():
                raise DitfError(f"{self.root} does not look like DAVIS-2017: {needed} is missing")
        if not self.list_file.is_file():
            raise DitfError(f"{self.root} does not look like DAVIS-2017: sequence list {self.list_file} is missing")
        if isinstance(sequences, str):
            sequences = [s for s in sequences.split(",") if s]
        self.only = list(sequences) if sequences else None
        self._sequences: list[VideoSequence] | None = None

    def sequence_names(self) -> list[str]:
        """Sequence names in list-file order (duplicates rejected)."""
        try:
            lines = self.list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DitfError(f"cannot read DAVIS sequence list {self.list_file}: {exc}") from exc
        names: list[str] = []
        for lineno, line in enumerate(lines, 1):
            name = line.strip()
            if not name:
                continue
            _plain_name(name, f"{self.list_file}:{lineno}")
            if name in names:
                raise DitfError(f"{self.list_file}:{lineno}: sequence {name!r} listed twice")
            names.append(name)
        if not names:
            raise DitfError(f"DAVIS sequence list {self.list_file} is empty")
        if self.only is not None:
            unknown = [s for s in self.only if s not in names]
            if unknown:
                raise DitfError(f"DAVIS sequence(s) {', '.join(map(repr, unknown))} are not in {self.list_file}")
            names = [n for n in names if n in self.only]
        return names

    def _sequence(self, name: str) -> VideoSequence:
        frame_dir = self.image_dir / name
        if not frame_dir.is_dir():
            raise DitfError(f"DAVIS frames folder {frame_dir} is missing (sequence {name!r} of {self.list_file})")
        frames = sorted(p for p in frame_dir.glob("*.jpg") if p.is_file() and not p.name.startswith("."))
        if not frames:
            raise DitfError(f"no .jpg frames in {frame_dir}")
        records = tuple(ImageRecord(key=f"{name}/{p.stem}", path=p, category=name) for p in frames)
        masks = tuple((self.mask_dir / name / f"{p.stem}.png") for p in frames)
        first = masks[0]
        if not first.is_file():
            raise DitfError(f"first-frame annotation {first} of DAVIS sequence {name!r} is missing")
        return VideoSequence(
            name=name,
            frames=records,
            first_mask=first,
            gt_masks=tuple(m if m.is_file() else None for m in masks),
        )

    # -- Dataset API --------------------------------------------------------------------------
    def sequences(self) -> list[VideoSequence]:
        """Every sequence of the split, in list-file order; frames sorted by file name."""
        if self._sequences is None:
            self._sequences = [self._sequence(name) for name in self.sequence_names()]
        return list(self._sequences)

    def images(self) -> list[ImageRecord]:
        """Every frame of every sequence, key ``<seq>/<frame stem>``, category = sequence name."""
        return [record for seq in self.sequences() for record in seq.frames]

    def category_of(self, key: str) -> str | None:
        name = key.split("/", 1)[0]
        for seq in self.sequences():
            if seq.name == name:
                return name if any(r.key == key for r in seq.frames) else None
        return None
