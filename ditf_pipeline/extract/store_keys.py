"""The run's keys in the store: which images are pending, each key set up or checked, its lock held.

Before the image index grows, every existing key is compared with this run's configuration (a
key written with other settings is refused, `identity.check_same_config`) and the images still
to do are found (`pending_records`). Then each key is created or reopened for all the run's
rows under its writer lock (`open_keys`): one writer per key for a whole run; with `--shard`,
shards take turns only to set a key up, then write their own images side by side, each owning
whole files of the small per-image arrays (`rows_per_file`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence

from ..core.errors import DitfError
from ..core.shards import Shard
from ..datasets.base import Dataset, ImageRecord
from ..models.base import CompileOptions, DiTAdapter
from ..store.feature_store import ROWS_PER_SHARD, FeatureArrays, FeatureStore
from ..store.schema import file_rows
from .identity import adaln_names, check_same_config, comparable_config, modulation_names, provenance, store_config
from .settings import ExtractSettings

__all__ = ["SHARD_SETUP_WAIT", "open_keys", "pending_records", "rows_per_file"]

#: seconds a shard waits for another shard (or a whole run) setting up the same key
SHARD_SETUP_WAIT = 600.0


def pending_records(store: FeatureStore, adapter: DiTAdapter, settings: ExtractSettings, dataset: Dataset,
                    records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The records this run will decode: not yet complete in every requested key (read-only).

    Also refuses a key written with other settings here, before the image index grows.
    """
    rows = store.image_rows(dataset.name)
    config = json.loads(json.dumps(store_config(adapter, settings), default=str))
    pending, missing_key = set(), False
    for t in settings.ts:
        for k in settings.ks:
            try:
                arrays = store.open_features(dataset.name, adapter.spec.name, k, t)
            except DitfError:  # key not created yet: every image is pending
                missing_key = True
                continue
            check_same_config(str(store.path), arrays.path, arrays.config, config)
            complete = arrays.complete()
            pending.update(r.key for r in records
                           if r.key not in rows or rows[r.key] >= len(complete) or not complete[rows[r.key]])
    return list(records) if missing_key else [r for r in records if r.key in pending]


def open_keys(store: FeatureStore, adapter: DiTAdapter, settings: ExtractSettings, dataset: Dataset,
              sizes: Sequence[tuple[int, int]], n_rows: int, shard: Shard, locks: contextlib.ExitStack,
              compile_options: CompileOptions) -> dict[tuple[int, int], FeatureArrays]:
    """Every requested key set up (or checked) for `n_rows` images, its writer lock held in `locks`."""
    config = store_config(adapter, settings)
    arrays: dict[tuple[int, int], FeatureArrays] = {}
    for t in settings.ts:
        for k in settings.ks:
            rows_max, cols_max, channels = adapter.feature_shape(settings.img_size, k)
            if settings.resize != "long":  # the grid's extent follows each image's aspect ratio
                grids = [adapter.grid_size(w, h, settings.img_size, settings.resize) for w, h in sizes]
                rows_max, cols_max = max(g[0] for g in grids), max(g[1] for g in grids)

            def open_key(k=k, t=t, grid_max=(rows_max, cols_max), channels=channels) -> FeatureArrays:
                try:
                    stored = store.open_features(dataset.name, adapter.spec.name, k, t).config
                except DitfError:  # not set up yet
                    stored = None
                return store.open_features(
                    dataset.name, adapter.spec.name, k, t, config=comparable_config(config, stored),
                    provenance=provenance(adapter, settings, compile_options),
                    n_images=n_rows, grid_max=grid_max, hidden_size=channels,
                    modulation_names=modulation_names(adapter), adaln=adapter.has_adaln,
                    adaln_names=adaln_names(adapter),
                )

            if shard.whole:
                # one writer per key: a second extract into the same key is refused, not interleaved
                locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t))
                arrays[(k, t)] = open_key()
            else:
                # shards take turns only to set the key up, then write their own images side by side
                with store.setup_lock(dataset.name, adapter.spec.name, k, t, wait=SHARD_SETUP_WAIT):
                    arrays[(k, t)] = open_key()
                locks.enter_context(store.writer_lock(dataset.name, adapter.spec.name, k, t, shard=str(shard)))
    return arrays


def rows_per_file(arrays: Mapping[tuple[int, int], FeatureArrays]) -> int:
    """Images per file of the keys' small per-image arrays: a shard owns whole files of them.

    Read from each key's `complete` array as it was created, so every shard of a key agrees on
    ownership whatever DITF_ROWS_PER_SHARD says now.
    """
    sizes = {file_rows(a.group["complete"]) for a in arrays.values()}
    if len(sizes) > 1:
        raise DitfError("the keys of this run keep different numbers of images per file ("
                        + ", ".join(f"{a.path}: {file_rows(a.group['complete'])}" for a in arrays.values())
                        + "): run --shard separately for each --k / --t")
    return sizes.pop() if sizes else ROWS_PER_SHARD
