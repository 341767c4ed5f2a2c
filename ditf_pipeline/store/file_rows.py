"""Rows of a feature key's small per-image arrays, read a file (shard) at a time, and the
opened arrays themselves, kept for the images read after.

Why: `FeatureArrays.read_image` reads, per image, the commit flag, the grid and up to three AdaLN
vectors. Each is one row of a 32-row shard, and each zarr read of a row costs ~1.5-3.5 ms of
CPU on the 2-core VM (opening the array's metadata, testing that its file exists, reading the
shard index, then the row), while the image's own 7 MB chunk costs ~11 ms: the small reads made
a third of a match's reads. Here each shard is read once, whole (a few hundred kB at most), and the next
31 images of it find their rows in memory.

A cached row is only trusted when it was written: a commit flag that is still False, a zero
grid or an all-NaN vector (the fill values) is read again alone by the caller, so an image
committed after its shard was cached, or a row missing from its shard, is seen exactly as the
per-row read sees it. A shard that cannot be read whole (one damaged image inside) gives None:
the caller reads the row alone, so the damage costs that image only, with its own error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import zarr
from zarr.core.sync import sync

from . import legacy
from .schema import file_key, file_rows

__all__ = ["FileRows", "chunk_exists"]

#: shards kept per key: the match order (by category, then image) reads rows nearly in order,
#: so a few shards per array suffice; bounded, as a video dataset has hundreds of thousands of frames
KEEP_FILES = 16


def chunk_exists(array: zarr.Array, row: int) -> bool:
    """Whether the file holding `row` (its chunk, or its shard) was written (a missing one would
    read as fill values). A schema-1 array may skip chunks equal to the fill value: there a
    missing chunk is taken as written."""
    if not legacy.writes_every_chunk(array):
        return True
    return bool(sync(array.store_path.store.exists(file_key(array, row))))


class FileRows:
    """Opened arrays of one zarr group and recently read files (shards) of its small arrays."""

    def __init__(self, group: zarr.Group, keep: int = KEEP_FILES) -> None:
        self._group = group
        self._keep = keep
        self._arrays: dict[str, zarr.Array] = {}
        self._files: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the GPU path reads images from several threads

    def array(self, name: str) -> zarr.Array:
        """The opened array `name` (opening one reads its metadata: ~0.6 ms)."""
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = self._group[name]
        return array

    def row(self, name: str, row: int) -> np.ndarray | None:
        """Row `row` of array `name`, from its file read whole; None where that file is missing or
        cannot be read whole (the caller reads the row alone and reports what is wrong)."""
        array = self.array(name)
        per_file = file_rows(array)
        start = row // per_file * per_file
        key = (name, start)
        with self._lock:
            block = self._files.get(key)
            if block is not None:
                self._files.move_to_end(key)
        if block is None:
            stop = min(start + per_file, array.shape[0])
            if row >= stop or not chunk_exists(array, start):
                return None
            try:
                block = np.asarray(array[start:stop])
            except Exception:  # one damaged row inside: the caller's per-row read names it
                return None
            with self._lock:
                self._files[key] = block
                while len(self._files) > self._keep:
                    self._files.popitem(last=False)
        return block[row - start] if row - start < len(block) else None

    def clear(self) -> None:
        """Forget everything: rows were un-committed, or arrays resized."""
        with self._lock:
            self._arrays.clear()
            self._files.clear()
