"""Where extracted features go: a sink per key, written on one thread behind the DiT.

The extract loop hands each image's features (z already float16, the AdaLN vectors float32:
`ensemble.stored_features`) to a `FeatureSink` per (k, t). The store's `FeatureArrays` is one
(it commits the image after its chunks, so a crash loses at most the images in flight);
`MemoryFeatures` is the other, for `DiTF.features()` without `store=`: it keeps the same values
in memory and reads them back as the store would, so the variants computed from either are
the same numbers. `WriterThread` runs the writes off the main thread, in order, so the main
thread queues image i+1's forward while image i is written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from ..core.errors import DitfError

__all__ = ["FeatureSink", "MemoryFeatures", "WriterThread"]


class FeatureSink(Protocol):
    """What the extract loop writes one key's images into."""

    def write_image(self, row: int, pre_adaln: np.ndarray, modulation: Mapping[str, np.ndarray]) -> None:
        """Keep one image's features (float16 z (rows, cols, D), vectors by name); the image counts
        as complete only once all of it is kept."""


class MemoryFeatures:
    """One key's features in memory, read back with the interface of the store's `FeatureArrays`
    that the match stage's readers use (`read_image`, `complete`, massive channels).

    z is kept as the float16 the store would hold and the vectors as float32, so the variants
    computed from here equal those computed from a store written by the same run.
    """

    def __init__(self, path: str, n_images: int, hidden_size: int, modulation_names: Sequence[str],
                 config: Mapping | None = None, image_key: Callable[[int], str] | None = None) -> None:
        self.path = path
        self._hidden_size = int(hidden_size)
        self._modulation_names = list(modulation_names)
        self._config = dict(config or {})
        self._image_key = image_key
        self._z: list[np.ndarray | None] = [None] * n_images
        self._vectors: list[dict[str, np.ndarray] | None] = [None] * n_images
        self._massive: list[int] | None = None

    @property
    def n_images(self) -> int:
        return len(self._z)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def modulation_names(self) -> list[str]:
        return list(self._modulation_names)

    def name_of(self, row: int) -> str:
        return self._image_key(row) if self._image_key is not None else f"row {row}"

    def write_image(self, row: int, pre_adaln: np.ndarray, modulation: Mapping[str, np.ndarray]) -> None:
        # converted as `FeatureArrays.write_image` converts them, so both sinks hold the same values
        vectors = {name: np.asarray(modulation[name], dtype=np.float32) for name in self._modulation_names}
        self._z[row] = np.asarray(pre_adaln, dtype=np.float16)
        self._vectors[row] = vectors  # last: the image is complete once both are there

    def complete(self) -> np.ndarray:
        return np.array([v is not None for v in self._vectors], dtype=bool)

    def read_image(self, row: int, vectors: Iterable[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(float16 z (rows, cols, D), modulation name -> (D,)), as `FeatureArrays.read_image` returns them."""
        stored = self._vectors[row]
        if stored is None:
            raise DitfError(f"image {self.name_of(row)} of {self.path} was not extracted")
        wanted = None if vectors is None else set(vectors)
        return self._z[row], {name: value for name, value in stored.items() if wanted is None or name in wanted}

    @property
    def massive_channels(self) -> list[int] | None:
        return None if self._massive is None else list(self._massive)

    def set_massive_channels(self, channels: Sequence[int], info: Mapping | None = None) -> None:
        """Kept for this call's later variants (as the store records them for its later readers)."""
        self._massive = sorted(int(c) for c in channels)


class WriterThread:
    """Sink writes on one thread, one at a time, in the order queued.

    The first failure is kept, later jobs are skipped, and the main thread raises that one
    error (`check`, called on every `put` and after `close`). The bounded queue holds back a
    main thread that runs ahead of the writes, so at most `depth` images wait in host memory.
    """

    def __init__(self, depth: int) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ditf-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.failure is not None:
                continue
            try:
                job()
            except BaseException as exc:  # raised on the main thread
                self.failure = exc

    def put(self, job: Callable[[], None]) -> None:
        self.check()
        self.jobs.put(job)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
