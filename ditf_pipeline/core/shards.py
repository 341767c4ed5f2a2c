"""`--shard i/N`: a deterministic share of the work for job arrays (SLURM and the like).

Many clusters have no long-lived dask scheduler; the common pattern is an array of N
independent jobs where job i processes its own share and exits. A shard is defined by position
in the dataset's own (deterministic) order, so every job computes the same split without talking
to the others:

* extract: image j (in `dataset.images()` order) belongs to shard j mod N. Each image is its own
  chunk in every array, so shards never write the same chunk.
* match: pairs are committed in blocks (one chunk of predictions each); block b belongs to shard
  b mod N, so shards never write the same chunk either.

Metadata (the image index, the arrays of a key, the prompt cache, the predictions group) is set
up by whichever shard comes first, for the WHOLE dataset, so the row of every image and pair is
the same as in a single run, and the union of all shards equals a single run bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import DitfError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based: `--shard 0/4` .. `--shard 3/4`)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        """'i/N' as given to `--shard` (None: the whole dataset)."""
        if text is None or text == "":
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise DitfError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/8 (SLURM: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise DitfError(f"--shard {text!r}: need N >= 1 and 0 <= i < N (shards are numbered from 0)")
        return cls(index, count)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items, by position in `items` (the dataset's order)."""
        return [item for position, item in enumerate(items) if self.owns(position)]

    def blocks(self, n_items: int, block: int) -> list[int]:
        """Start offsets of this shard's blocks of `block` consecutive items."""
        return [start for b, start in enumerate(range(0, n_items, block)) if self.owns(b)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
