"""Any directory of images: extract features for your own pictures, no annotations, no pairs."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import DitfError
from . import register
from .base import Dataset, ImageRecord

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@register
class ImageFolder(Dataset):
    """Every image under `root`, recursively, sorted by key.

    key = path relative to the root without its extension (``"dogs/rex"``), so keys are stable
    when the folder is moved; category = name of the image's parent folder, None at the top
    level. Hidden files and folders (names starting with ".") are skipped: they are editor /
    OS debris such as macOS ``._photo.jpg`` resource forks, which are not images.
    """

    name = "folder"
    alphas = ()
    threshold_rule = "none (unannotated images)"

    def __init__(self, root: Path | str, split: str | None = None) -> None:
        super().__init__(root, split)
        if split is not None:
            raise DitfError(f"dataset 'folder' has no splits; got split={split!r}")
        if not self.root.is_dir():
            raise DitfError(f"image folder {self.root} does not exist or is not a directory")
        self._records: list[ImageRecord] | None = None

    def images(self) -> list[ImageRecord]:
        if self._records is None:
            found: dict[str, Path] = {}
            for dirpath, dirnames, filenames in os.walk(self.root):  # does not follow dir symlinks
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for filename in filenames:
                    path = Path(dirpath) / filename
                    if filename.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    key = path.relative_to(self.root).with_suffix("").as_posix()
                    if key in found:
                        raise DitfError(f"two images share the key {key!r}: {found[key]} and {path}; rename one")
                    found[key] = path
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise DitfError(f"no images ({suffixes}) found under {self.root}")
            self._records = [
                ImageRecord(key=key, path=found[key], category=key.rsplit("/", 2)[-2] if "/" in key else None)
                for key in sorted(found)
            ]
        return list(self._records)
