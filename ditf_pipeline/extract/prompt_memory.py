"""Encoded prompts kept in memory by one model object, across extract runs (the Python API).

Each `DiTF.features` call is a run of its own, into a store that may be new (a temporary one
without `store=`) and so holds no encoded prompt: without this, the text encoders (T5-XXL on
Flux) would be loaded, run and freed on every call. The memory is bounded in bytes and drops
the least recently used prompt first; it belongs to one adapter, so its encoders are the ones
that produced every entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["DEFAULT_PROMPT_MEMORY_BYTES", "PromptMemory"]

#: 256 MiB: about 30 Flux prompts (T5 512 x 4096 float32 each), thousands of tiny-model ones
DEFAULT_PROMPT_MEMORY_BYTES = 256 * 2**20


class PromptMemory:
    """text -> encoded prompt ({name: float32 array}), least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_PROMPT_MEMORY_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_many(self, texts: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """The remembered texts among `texts` (each marked as used now)."""
        found = {}
        for text in texts:
            if text in self._entries:
                self._entries.move_to_end(text)
                found[text] = self._entries[text]
        return found

    def put(self, text: str, embedding: Mapping[str, np.ndarray]) -> None:
        """Remember one prompt; one larger than the whole budget is not kept."""
        entry = {name: np.asarray(value, dtype=np.float32) for name, value in embedding.items()}
        size = sum(value.nbytes for value in entry.values())
        if size > self.max_bytes:
            return
        if text in self._entries:
            self._bytes -= sum(value.nbytes for value in self._entries.pop(text).values())
        self._entries[text] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= sum(value.nbytes for value in dropped.values())
