"""Stores of older schemas: the rules that read them as they are, and the migration, in one place.

* Schema 1 had no commit mark on the image index (every row counts), wrote no chunk equal to the
  fill value (a missing chunk may mean "all fill"), kept one pair list's predictions unscoped
  (``predictions/<variant>/<protocol>``), could leave a feature key half set up (no `config`)
  and empty lock folders, and some keys have no `modulation` attribute (they hold AdaLN).
* Schema 2 keys keep one chunk per image everywhere (no shards): read and resumed as they are.

A writing command migrates a store in place (`migrate`): additive only, older data stays.
"""

from __future__ import annotations

import numpy as np
import zarr

from ..core.errors import DitfError
from .schema import SCHEMA_VERSION
from .store_access import StoreAccess

__all__ = ["MODULATION_OF_SCHEMA_1", "clear_half_setup", "committed_rows", "migrate", "unscoped_predictions",
           "writes_every_chunk"]

#: the AdaLN vectors of a key that records no `modulation` attribute (schema 1)
MODULATION_OF_SCHEMA_1 = ("shift", "scale", "gate")


def committed_rows(index: zarr.Group) -> int:
    """Rows of the image index that are committed: `count` (schema 2+), else every row."""
    return int(index.attrs.get("count", index["key"].shape[0]))


def writes_every_chunk(array: zarr.Array) -> bool:
    """Whether every chunk of `array` was written (schema 2+: checksummed, written even when
    equal to the fill value). A missing chunk of a schema-1 array may be all fill values."""
    for codec in array.metadata.codecs:
        if isinstance(codec, zarr.codecs.Crc32cCodec):
            return True
        if isinstance(codec, zarr.codecs.ShardingCodec):
            return any(isinstance(inner, zarr.codecs.Crc32cCodec) for inner in codec.codecs)
    return False


def unscoped_predictions(base: str, name: str) -> str:
    """Where schema 1 kept the predictions `name` of its one pair list (under `base`, a key's predictions)."""
    return f"{base}/{name}"


def clear_half_setup(store: StoreAccess, group: zarr.Group, path: str) -> None:
    """Remove a feature key that a schema-1 run left half set up (no `config` or no `complete`).

    Raises
    ------
    DitfError
        When it holds committed images: they cannot be trusted without a configuration, and are
        not removed silently (`ditf doctor --repair` does).
    """
    if "complete" in group and np.asarray(group["complete"][:]).any():
        raise DitfError(f"store {store.path} key {path} has committed images but no configuration "
                        "(an interrupted schema-1 setup): run `ditf doctor --repair`")
    store.delete(path)


def migrate(store: StoreAccess) -> list[str]:
    """Bring an older store to the current schema in place (additive: older data stays as it is).

    Schema 2 added the image index's commit mark (`count`, set to today's rows); schema-1
    predictions and prompt caches are still read where they are. Schema 3 shards the small
    per-image arrays of new keys; schema-2 keys keep one chunk per image and are read and
    resumed as they are. The version is written last. Returns what was done, line by line.
    """
    done = []
    for name in store.layout.datasets():
        group = store.group(f"{name}/images")
        if group is not None and "count" not in group.attrs and "key" in group:
            group.attrs["count"] = int(group["key"].shape[0])
            done.append(f"{name}/images: commit mark count={group.attrs['count']} added")
    store.root.attrs["ditf_schema_version"] = SCHEMA_VERSION
    store.schema_version = SCHEMA_VERSION
    return done + [f"schema version set to {SCHEMA_VERSION}"]
