"""The byte-bounded LRU cache of the match stage (feature maps, per-target maps).

Why bytes and not entries: see `ByteLRU`. Kept apart from the matchers since the feature cache
of the driver (`predict.FeatureCache`), both protocols and `ditf view` share it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
import torch


def nbytes(value) -> int:
    """Memory held by a cached value: tensors, arrays, and tuples/lists/dicts of them."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if dataclasses.is_dataclass(value):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class ByteLRU:
    """A least-recently-used cache bounded by the bytes its values hold; thread-safe.

    Why bytes: the values are feature maps and per-target maps whose size varies with the image,
    and the match stage's memory promise (about 1 GB at SPair size) is a byte promise. A key
    being computed by one thread is waited for by the others (computed once, never twice at a
    time); a value larger than the whole budget is returned but not kept. `hits` and `misses`
    count lookups (for tests and benchmarks).
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[object], int] = nbytes) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.sizeof = sizeof
        self._items: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._pending: dict = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable | None, compute: Callable[[], object]):
        if key is None or self.max_bytes == 0:
            return compute()
        while True:
            with self._lock:
                if key in self._items:
                    self.hits += 1
                    self._items.move_to_end(key)
                    return self._items[key]
                event = self._pending.get(key)
                if event is None:  # this thread computes the value
                    self.misses += 1
                    event = self._pending[key] = threading.Event()
                    break
            event.wait()  # another thread computes it; look again (it may have failed or been evicted)
        try:
            value = compute()
            self._put(key, value)
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            event.set()

    def _put(self, key: Hashable, value) -> None:
        size = self.sizeof(value)
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = value
            self._sizes[key] = size
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                self.bytes -= self._sizes.pop(old)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.bytes = 0

