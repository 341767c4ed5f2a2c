"""What the store's helpers need of an opened store, as a protocol `FeatureStore` satisfies.

The schema migration (`legacy`) and the prompt cache (`prompts`) work on the store that
`FeatureStore` composes them into. Typed against this protocol rather than the facade itself,
they do not import `feature_store`, which imports them: the store package has no import cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import zarr

from .layout import StoreLayout

__all__ = ["StoreAccess"]


class StoreAccess(Protocol):
    """The nodes of one opened store: read, staged, published, removed and locked."""

    #: a Path for a local store, the URL for an object store (for messages)
    path: Path | str
    read_only: bool
    layout: StoreLayout
    root: zarr.Group
    schema_version: int

    def group(self, path: str) -> zarr.Group | None:
        """The group at `path`, None if absent."""

    def subgroups(self, path: str) -> list[tuple[str, zarr.Group]]:
        """The child groups of `path`, sorted by name."""

    def staged(self, attributes: Mapping | None = None) -> contextlib.AbstractContextManager[tuple[str, zarr.Group]]:
        """A new group under `.ditf/staging/`, to be built and then published."""

    def publish(self, staged: str, node: str) -> bool:
        """Move a staged group to `node` whole; False when `node` exists already."""

    def delete(self, path: str) -> None:
        """Remove a node whole."""

    def lock(self, node: str, refusal: str, wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Exclusive right to write one node."""
