"""`ditf pack`: chosen keys of a store copied into a new, self-contained store ready to publish.

A published store is read where nothing can be listed (HTTP, the Hugging Face Hub), so the
pack holds exactly what readers need and says so up front: the image index of each dataset,
each chosen feature key, optionally its predictions, and consolidated metadata in the root's
zarr.json (readers open it with that one read, `backends.published`). Every chunk file is
copied byte for byte and then decoded from the copy, which verifies its CRC32C checksums: a
damaged chunk stops the pack with an error naming the image, before anything is published. The
pack is built beside its destination and renamed into place, so an interrupted pack leaves no
half store.

Layout of the destination folder (a Hub dataset repository as it is uploaded)::

    <out>/README.md        the dataset card (written by the caller, `card`)
    <out>/manifest.json    every key with its files, bytes, images and config
    <out>/ditf.zarr/       the store
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ..core.errors import DitfError
from ..core.keys import FeatureKey
from .failures import reason
from .feature_store import FeatureStore
from .layout import IMAGES, PREDICTIONS
from .schema import SCHEMA_VERSION
from .writers import consolidate

__all__ = ["STORE_NAME", "PackItem", "PackPlan", "check_out", "plan_pack", "write_pack"]

#: the store's folder inside a pack (``hf://datasets/<org>/<name>/ditf.zarr``)
STORE_NAME = "ditf.zarr"


@dataclass
class PackItem:
    """One thing a pack copies: an image index or a feature key (with its predictions, if chosen)."""

    node: str  # the node path ("spair/images", "spair/flux/k28/t260")
    arrays: list[str]  # every array node under it
    groups: list[str]  # every group node under it (itself included)
    files: dict[str, int] = field(default_factory=dict)  # chunk file key -> bytes
    config: dict | None = None  # a feature key's config
    images: int | None = None  # a feature key's committed images
    predictions: list[str] = field(default_factory=list)  # "[scope/]variant/protocol" of each predictions group

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


@dataclass
class PackPlan:
    """What a pack will copy, with the sizes (printed before copying)."""

    source: FeatureStore
    items: list[PackItem]

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.items)

    def keys(self) -> list[PackItem]:
        return [item for item in self.items if item.config is not None]


def _list(store: zarr.abc.store.Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return sorted([key async for key in store.list_prefix(prefix)])

    return sync(collect())


def _nodes_under(source: FeatureStore, node: str, skip: str | None = None) -> tuple[list[str], list[str]]:
    """(arrays, groups) under `node` (itself included), through zarr's metadata; `skip` left out."""
    group = source.group(node)
    if group is None:
        raise DitfError(f"store {source.path} has no {node}")
    arrays, groups = [], [node]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, member in sorted(group.members(max_depth=None)):
            path = f"{node}/{name}"
            if skip is not None and (path == skip or path.startswith(skip + "/")):
                continue
            (groups if isinstance(member, zarr.Group) else arrays).append(path)
    return arrays, groups


def plan_pack(source: FeatureStore, *, dataset: str | None = None, model: str | None = None,
              k: int | None = None, t: int | None = None, predictions: bool = True) -> PackPlan:
    """The keys matching the filters (None: any), each dataset's image index, and their sizes.

    Raises
    ------
    DitfError
        When no key of the store matches.
    """
    keys = [key for key in source.layout.feature_keys(dataset)
            if (model is None or key.model == model) and (k is None or key.k == k) and (t is None or key.t == t)]
    if not keys:
        have = ", ".join(key.path for key in source.layout.feature_keys()) or "nothing"
        raise DitfError(f"store {source.path} has no feature key matching the choice (it has {have})")
    zstore = source.backend.zarr_store("", read_only=True)
    items = []
    for ds in sorted({key.dataset for key in keys}):
        arrays, groups = _nodes_under(source, f"{ds}/{IMAGES}")
        items.append(PackItem(f"{ds}/{IMAGES}", arrays, groups))
    for key in keys:
        arrays, groups = _nodes_under(source, key.path, skip=None if predictions else f"{key.path}/{PREDICTIONS}")
        feature_arrays = source.feature_arrays(key)
        item = PackItem(key.path, arrays, groups, config=feature_arrays.config,
                        images=int(feature_arrays.complete().sum()))
        if predictions:
            item.predictions = [name for name, _ in source.prediction_groups(key.dataset, key.model, key.k, key.t)]
        items.append(item)
    for item in items:
        for array in item.arrays:
            for name in _list(zstore, f"{array}/"):
                if name != f"{array}/zarr.json":  # an array has no child nodes: the rest are its chunk files
                    item.files[name] = int(sync(zstore.getsize(name)))
    return PackPlan(source, items)


def _verify(dest: LocalStore, array_path: str, file: str, name_of: Callable[[int], str]) -> None:
    """Decode the copied file's region of the array: zarr checks every CRC32C on the way."""
    array = zarr.open_array(store=dest, path=array_path, mode="r")
    coords = [int(c) for c in file[len(array_path) + 1:].split("/")[1:]]
    shape = array.metadata.chunk_grid.chunk_shape
    region = tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, shape))
    try:
        array[region]
    except Exception as exc:
        raise DitfError(f"pack: {file} ({name_of(region[0].start)}) is damaged in the source ({reason(exc)}): "
                        "run `ditf doctor --store SOURCE --repair`, then extract again") from exc


def _namer(source: FeatureStore, item: PackItem, array_path: str) -> Callable[[int], str]:
    """How a row of `array_path` is named in an error: its image, or its pairs."""
    if item.config is not None and f"/{PREDICTIONS}/" not in array_path:
        dataset = item.node.split("/")[0]
        return lambda row: f"image {source.image_key(dataset, row)}"
    return lambda row: f"rows from {row}"


def check_out(out: Path) -> None:
    """Refuse a destination holding anything: a pack never mixes with other files.

    Raises
    ------
    DitfError
        When `out` exists and is not an empty folder.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DitfError(f"pack --out {out} exists and is not empty: name a new folder")


def write_pack(plan: PackPlan, out: Path, card: str, *, version: str,
               progress: Callable[[str], None] | None = None) -> dict:
    """Copy the plan into `out` (a new folder): the store, its manifest and its card; returns the manifest.

    `version`: the ditf version recorded in the manifest.

    Raises
    ------
    DitfError
        When `out` exists and is not empty, or a chunk is damaged (nothing is left at `out`).
    """
    check_out(out)
    source = plan.source
    src = source.backend.zarr_store("", read_only=True)
    staged = out.parent / f".{out.name}.ditf-pack-{uuid.uuid4().hex[:8]}"
    dest_root = staged / STORE_NAME
    prototype = default_buffer_prototype()

    def copy(key: str) -> bytes:
        value = sync(src.get(key, prototype))
        if value is None:
            raise DitfError(f"pack: {source.path}/{key} vanished while packing")
        data = value.to_bytes()
        target = dest_root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return data

    try:
        dest_root.mkdir(parents=True)
        dest = LocalStore(dest_root)
        copy("zarr.json")
        meta = json.loads((dest_root / "zarr.json").read_text())
        meta.pop("consolidated_metadata", None)  # rewritten below for exactly what the pack holds
        (dest_root / "zarr.json").write_text(json.dumps(meta, indent=2))
        for item in plan.items:
            parts = item.node.split("/")
            for depth in range(1, len(parts)):  # the groups above the item
                ancestor = "/".join(parts[:depth])
                if not (dest_root / ancestor / "zarr.json").exists():
                    copy(f"{ancestor}/zarr.json")
            for group in item.groups:
                copy(f"{group}/zarr.json")
            for array in item.arrays:
                copy(f"{array}/zarr.json")
                name_of = _namer(source, item, array)
                for file in sorted(f for f in item.files if f.startswith(f"{array}/")):
                    copy(file)
                    _verify(dest, array, file, name_of)
            if progress is not None:
                progress(f"pack: {item.node}: {len(item.files)} file(s), {item.bytes / 1e6:.1f} MB copied and verified")
        consolidate(dest_root)
        manifest = {
            "ditf": version,
            "schema_version": SCHEMA_VERSION,
            "store": STORE_NAME,
            "source": str(source.path),
            "bytes": plan.bytes,
            "items": [{"node": item.node, "files": len(item.files), "bytes": item.bytes,
                       **({"images": item.images, "config": item.config, "predictions": item.predictions}
                          if item.config is not None else {})} for item in plan.items],
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staged / "README.md").write_text(card)
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return manifest


def key_of(item: PackItem) -> FeatureKey:
    """The feature key of a key item."""
    return FeatureKey.parse(item.node)
