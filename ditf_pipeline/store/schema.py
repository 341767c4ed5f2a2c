"""What each node of the store holds: codecs, chunking, dtypes, and how a new node is built.

The schema of the current version (`ditf_pipeline.core.version.SCHEMA_VERSION`, documented in
stores/README.md) written down once: every new image index, feature key, predictions group and
prompt entry is created by a function of this module, so the codecs and chunk shapes of a node
are decided in one place. Older schemas are read by `legacy`.

No process-wide zarr configuration is set anywhere: what the store needs from zarr is given
per array (`WRITE_CONFIG`, applied by `writable`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from ..core.errors import DitfError
from ..core.version import SCHEMA_VERSION

__all__ = ["COMPRESSED", "FEATURE_DTYPES", "INDEX_CHUNK", "MODULATION_DTYPE", "PLAIN", "ROWS_PER_SHARD", "SCHEMA_VERSION",
           "WRITE_CONFIG", "config_differences", "create_digest_array", "create_feature_arrays", "create_index_arrays", "create_prediction_arrays",
           "create_prompt_arrays", "file_key", "file_rows", "jsonable", "root_metadata", "writable"]

_COMPRESSOR = zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
#: every chunk is checksummed: a flipped byte is an error, never a wrong number
_CHECKSUM = zarr.codecs.Crc32cCodec()
COMPRESSED = (_COMPRESSOR, _CHECKSUM)
PLAIN = (_CHECKSUM,)
#: rows per chunk of the image index's arrays
INDEX_CHUNK = 4096
#: images per file of the small per-image arrays (grid, AdaLN vectors, complete): zarr shards.
#: A shard is rewritten whole when one of its images is committed (one atomic file replace),
#: so two writers must never share one: `--shard i/N` hands out rows in blocks of this size.
#: (DITF_ROWS_PER_SHARD sets it for new keys: tests use small blocks so shards interleave)
ROWS_PER_SHARD = int(os.environ.get("DITF_ROWS_PER_SHARD") or 32)
#: the dtype of every feature array; anything else in the metadata means it was damaged
FEATURE_DTYPES = {"pre_adaln": "float16", "grid": "int32", "complete": "bool"}
MODULATION_DTYPE = "float32"
#: every chunk is written, even one equal to the fill value (zarr skips those by default): a
#: missing chunk of a committed image then always means damage, never "all zeros". Given to
#: each array the store writes through, never set for the whole process.
WRITE_CONFIG: Mapping[str, Any] = {"write_empty_chunks": True}
#: settings recorded in `config` that do not change the numbers (so a schema-1 key can be resumed)
_IGNORED_CONFIG = {"schema_version"}


def writable(array: zarr.Array) -> zarr.Array:
    """`array` as the store writes through it (every chunk written, see `WRITE_CONFIG`)."""
    if hasattr(array, "with_config"):
        return array.with_config(dict(WRITE_CONFIG))
    # zarr 3.1.3-3.1.5 (the floor is 3.1.3) lack `with_config`: build the same copy as it does
    import dataclasses

    from zarr.core.array import AsyncArray

    inner = array._async_array
    config = dataclasses.replace(inner._config, **WRITE_CONFIG)
    return type(array)(AsyncArray(metadata=inner.metadata, store_path=inner.store_path, config=config))


def jsonable(value: Any) -> Any:
    """`value` as it reads back from a zarr attribute (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def config_differences(stored: Mapping, wanted: Mapping) -> list[str]:
    """'name: stored -> wanted' for every setting that differs (what a refusal names).

    An architecture recorded without its transformer class (keys written before the class was
    recorded) is compared on blocks and width alone: those fix the numbers for a registry model.
    """
    arch_stored, arch_wanted = stored.get("architecture"), wanted.get("architecture")
    if isinstance(arch_stored, Mapping) and isinstance(arch_wanted, Mapping) and "class" not in arch_stored:
        wanted = {**wanted, "architecture": {k: v for k, v in arch_wanted.items() if k != "class"}}
    keys = sorted((set(stored) | set(wanted)) - _IGNORED_CONFIG)
    return [f"{key}: {stored.get(key)!r} -> {wanted.get(key)!r}" for key in keys if stored.get(key) != wanted.get(key)]


def refuse_other_config(store: str, key: str, stored: Mapping, wanted: Mapping) -> None:
    """Refuse to reuse `key` of `store` for `wanted` settings when it was written with others.

    One wording for the extractor's early check (before the image index grows) and the store's
    own check when the key is opened for writing.
    """
    differences = config_differences(stored, wanted)
    if differences:
        raise DitfError(f"store {store} key {key} was written with another configuration ("
                        + "; ".join(differences) + "): use another --store or the stored settings")


def root_metadata() -> bytes:
    """The root node's zarr.json as zarr writes it (it holds only the schema version)."""
    memory = zarr.storage.MemoryStore()
    zarr.create_group(store=memory, attributes={"ditf_schema_version": SCHEMA_VERSION})
    return sync(memory.get("zarr.json", zarr.core.buffer.default_buffer_prototype())).to_bytes()


def file_rows(array: zarr.Array) -> int:
    """Rows (images or pairs) per stored file: the chunk, or the shard of a sharded array."""
    return int(array.metadata.chunk_grid.chunk_shape[0])


def file_key(array: zarr.Array, row: int) -> str:
    """The store key of the file (chunk, or shard) holding `row` of `array`."""
    coords = (row // file_rows(array),) + (0,) * (array.ndim - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


# ---- new nodes ----------------------------------------------------------------------------------
def create_index_arrays(group: zarr.Group) -> None:
    """An empty image index: `key` (image,) str, `size` (image, wh) int32 and `digest` (image,) str
    (what the row was computed from: `create_digest_array`), rows appended later."""
    group.create_array("key", shape=(0,), chunks=(INDEX_CHUNK,), dtype=str, fill_value="",
                       compressors=PLAIN, dimension_names=("image",))
    group.create_array("size", shape=(0, 2), chunks=(INDEX_CHUNK, 2), dtype="int32", fill_value=0,
                       compressors=PLAIN, dimension_names=("image", "wh"))
    create_digest_array(group, 0)


def create_digest_array(group: zarr.Group, n_rows: int) -> None:
    """The index's `digest` column: per row, the digest of the decoded pixels it was computed from.

    An index written before the column existed gets it when it next grows; its older rows keep
    "" (no digest recorded: only their size is compared).
    """
    digest = group.create_array("digest", shape=(n_rows,), chunks=(INDEX_CHUNK,), dtype=str, fill_value="",
                                compressors=PLAIN, dimension_names=("image",))
    if n_rows:  # every chunk written, as for every array of the current schema
        writable(digest)[:] = np.full(n_rows, "", dtype=object).astype(str)


def create_feature_arrays(group: zarr.Group, *, n_images: int, grid_max: tuple[int, int], hidden_size: int,
                          modulation_names: Sequence[str]) -> None:
    """The arrays of a new feature key: one `pre_adaln` chunk per image, the small arrays sharded.

    The small per-image arrays hold one chunk per image inside one file per `ROWS_PER_SHARD`
    images (zarr's sharding codec), so an image adds one file (its pre_adaln chunk) plus a
    fraction; see stores/README.md "Files per image". The AdaLN vectors are NaN-filled: a
    committed image whose vector is absent from its shard is an error, never zeros.
    """
    rows, cols = grid_max
    group.create_array(
        "pre_adaln", shape=(n_images, rows, cols, hidden_size), chunks=(1, rows, cols, hidden_size),
        dtype="float16", fill_value=0, compressors=COMPRESSED, dimension_names=("image", "row", "col", "channel"),
    )
    group.create_array("grid", shape=(n_images, 2), chunks=(1, 2), shards=(ROWS_PER_SHARD, 2), dtype="int32",
                       fill_value=0, compressors=PLAIN, dimension_names=("image", "axis"))
    for name in modulation_names:
        group.create_array(name, shape=(n_images, hidden_size), chunks=(1, hidden_size),
                           shards=(ROWS_PER_SHARD, hidden_size), dtype="float32", fill_value=np.nan,
                           compressors=PLAIN, dimension_names=("image", "channel"))
    group.create_array("complete", shape=(n_images,), chunks=(1,), shards=(ROWS_PER_SHARD,), dtype=bool,
                       fill_value=False, compressors=PLAIN, dimension_names=("image",))


def create_prediction_arrays(group: zarr.Group, *, pair_ids: Sequence[str], value_shape: tuple[int, ...],
                             block: int) -> None:
    """A new predictions group: `pair_id` (filled now), NaN-filled `pred`, and `done` per block of pairs."""
    n = len(pair_ids)
    ids = group.create_array("pair_id", shape=(n,), chunks=(max(n, 1),), dtype=str, fill_value="",
                             compressors=PLAIN, dimension_names=("pair",), config=dict(WRITE_CONFIG))
    ids[:] = np.array(list(pair_ids), dtype=object).astype(str)
    dims = ("pair", "keypoint", "xy") if len(value_shape) == 2 and value_shape[1] == 2 else (
        "pair", *(f"axis{i}" for i in range(len(value_shape))))
    group.create_array("pred", shape=(n, *value_shape), chunks=(block, *value_shape), dtype="float32",
                       fill_value=np.nan, compressors=COMPRESSED, dimension_names=dims)
    group.create_array("done", shape=(n,), chunks=(block,), dtype=bool, fill_value=False,
                       compressors=PLAIN, dimension_names=("pair",))


def create_prompt_arrays(group: zarr.Group, embedding: Mapping[str, np.ndarray]) -> None:
    """One encoded prompt: an array per embedding, float32, written at once."""
    for name, value in sorted(embedding.items()):
        value = np.asarray(value, dtype=np.float32)
        array = group.create_array(name, shape=value.shape, chunks=value.shape or None, dtype="float32",
                                   fill_value=0, compressors=COMPRESSED, config=dict(WRITE_CONFIG),
                                   dimension_names=tuple(f"{name}_{i}" for i in range(value.ndim)))
        array[...] = value
