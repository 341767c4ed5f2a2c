"""The prompt cache: encoded prompts of one model, so text encoders run once per distinct prompt.

One group per prompt (named by the text's digest) under ``prompts/<model>-<digest of the
encoder's identity>/``, published whole: a kill while caching leaves each prompt either cached
or absent. Writers hold the cache's lock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import numpy as np
import zarr

from .failures import writes
from .layout import PROMPTS
from .schema import create_prompt_arrays, jsonable
from .store_access import StoreAccess

__all__ = ["PromptCache", "prompt_cache_path"]

#: how long a writer waits for the prompt-cache lock held by a concurrent extract of the same model
_PROMPT_LOCK_WAIT = 600.0


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompt_cache_path(model: str, identity: Mapping) -> str:
    """The cache of `model` whose encoders are `identity` (weights source, revision, dtype)."""
    digest = hashlib.sha256(json.dumps(jsonable(identity), sort_keys=True).encode()).hexdigest()[:10]
    return f"{PROMPTS}/{model}-{digest}"


class PromptCache:
    """Encoded prompts of one model in one store."""

    def __init__(self, store: StoreAccess, path: str, identity: Mapping) -> None:
        self.store = store
        self.path = path
        self.identity = identity
        self.read_only = store.read_only

    def _entry(self, text: str) -> zarr.Group | None:
        group = self.store.group(f"{self.path}/{_text_digest(text)}")
        if group is None or group.attrs.get("text") != text:
            return None
        return group

    def get(self, text: str) -> dict[str, np.ndarray] | None:
        """The cached embeddings of `text`, or None (a damaged entry is a miss: it is encoded again)."""
        group = self._entry(text)
        if group is None:
            return None
        try:
            return {name: np.asarray(group[name][...]) for name in group.attrs["names"]}
        except Exception:
            return None

    def get_many(self, texts: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """text -> embeddings for the texts that are cached."""
        found = {text: self.get(text) for text in texts}
        return {text: value for text, value in found.items() if value is not None}

    def texts(self) -> dict[str, int]:
        """Cached prompt texts (the value is an ordinal, kept for callers of schema 1)."""
        texts = []
        for _, group in self.store.subgroups(self.path) if self.store.group(self.path) is not None else []:
            if "text" in group.attrs:
                texts.append(str(group.attrs["text"]))
        return {text: i for i, text in enumerate(sorted(texts))}

    @writes
    def put(self, text: str, embedding: Mapping[str, np.ndarray]) -> None:
        """Cache the embeddings of `text` (an entry with the same digest is replaced)."""
        store = self.store
        with store.lock(self.path, f"another process is writing the prompt cache {self.path} of {store.path}",
                        wait=_PROMPT_LOCK_WAIT):
            if store.group(self.path) is None:
                with store.staged({"identity": self.identity}) as (staged, _):
                    store.publish(staged, self.path)
            node = f"{self.path}/{_text_digest(text)}"
            if store.group(node) is not None:
                store.delete(node)  # another text with the same digest prefix, or a damaged entry
            with store.staged({"text": text, "names": sorted(embedding)}) as (staged, new):
                create_prompt_arrays(new, embedding)
                store.publish(staged, node)
