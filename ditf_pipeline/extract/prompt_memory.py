"""Encoded prompts kept in memory by one model object, across extract runs (the Python API).

Each `DiTF.features` call is a run of its own, into a store that may be new or into no store at
all (without `store=`), and so finds no encoded prompt there: without this, the text encoders
(T5-XXL on Flux) would be loaded, run and freed on every call. `embeddings_for` is the whole
lookup: the store's prompt cache, this memory, then the encoders. The memory is bounded in bytes and drops
the least recently used prompt first; it belongs to one adapter, so its encoders are the ones
that produced every entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..models.base import DiTAdapter, PromptEmbedding
    from ..store.feature_store import FeatureStore

__all__ = ["DEFAULT_PROMPT_MEMORY_BYTES", "PromptMemory", "embeddings_for"]

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


def embeddings_for(adapter: DiTAdapter, store: FeatureStore | None, texts: set[str]) -> dict[str, PromptEmbedding]:
    """Embeddings of every text in `texts` (name -> float32 torch tensor), encoding only the missing ones.

    Looked up in `store`'s prompt cache (none without a store), then in the adapter's own
    `prompt_memory` (a model object kept across runs, the Python API's, remembers what it encoded
    before); only what neither holds loads the text encoders, which are released afterwards.
    Whatever is found or encoded goes into both, so the next run finds it wherever it looks.
    """
    import torch

    cache = None if store is None else store.prompt_cache(
        adapter.spec.name,
        {"source": adapter.source, "revision": adapter.revision, "dtype": str(adapter.dtype), "model": adapter.spec.name},
    )
    found = cache.get_many(texts) if cache is not None else {}
    memory: PromptMemory | None = getattr(adapter, "prompt_memory", None)
    if memory is not None:
        for text, embedding in memory.get_many(texts - set(found)).items():
            if cache is not None:
                cache.put(text, embedding)
            found[text] = embedding
    missing = sorted(texts - set(found))
    if missing:
        for text, embedding in zip(missing, adapter.encode_prompts(missing)):
            numpy_embedding = {name: value.float().numpy() for name, value in embedding.items()}
            if cache is not None:
                cache.put(text, numpy_embedding)
            found[text] = numpy_embedding
        adapter.release_text_encoders()
    if memory is not None:
        for text, embedding in found.items():
            memory.put(text, embedding)
    return {text: {name: torch.from_numpy(np.asarray(v)) for name, v in emb.items()} for text, emb in found.items()}
