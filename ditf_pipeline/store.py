"""The feature store: the only module that touches Zarr.

Layout (Zarr v3, documented in stores/README.md)::

    <store>/                                   attrs: ditf_schema_version
      <dataset>/images/{key, size}             image index: row i of every array below is image key[i]
      <dataset>/<model>/k<k>/t<t>/             attrs: config (must match to write), provenance
          pre_adaln  (image, row, col, channel) float16, one chunk per image, zero padded
          grid       (image, axis)              int32, valid (rows, cols) of pre_adaln
          shift, scale, gate [, *_t, *_c]       (image, channel) float32
          complete   (image,)                   bool, written last: the commit mark of an image
          predictions/<variant>/<protocol>/     {pair_id, pred, done}
      prompts/<model>-<digest>/                 encoded prompt cache {text, <embedding names>, complete}

Crash safety: zarr's local store writes each chunk atomically (temp file + rename), every image
lives in its own chunks, and `complete[i]` is written only after all of image i's chunks, so a
kill at any moment leaves image i either complete or redone on the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from . import SCHEMA_VERSION
from .errors import DitfError

_COMPRESSOR = zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
_INDEX_CHUNK = 4096


def _writes(method):
    """Turn an OS-level write failure (disk full, read-only, permissions) into one clear line.

    Whatever was committed before stays readable: chunks are written atomically and an image
    is committed only by its `complete` flag, so a failed write leaves at most an uncommitted
    image behind.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            where = getattr(self, "path", None) or getattr(getattr(self, "group", None), "store_path", "the store")
            reason = exc.strerror or str(exc)
            raise DitfError(f"cannot write to store {where}: {reason}; data committed so far is intact, rerun to resume") from exc

    return wrapper


def feature_path(dataset: str, model: str, k: int, t: int) -> str:
    return f"{dataset}/{model}/k{k}/t{t}"


def config_differences(stored: Mapping, wanted: Mapping) -> list[str]:
    """'name: stored -> wanted' for every setting that differs."""
    keys = sorted(set(stored) | set(wanted))
    return [f"{key}: {stored.get(key)!r} -> {wanted.get(key)!r}" for key in keys if stored.get(key) != wanted.get(key)]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


class FeatureStore:
    """A Zarr group holding cached DiT features, prompt embeddings and predictions."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise DitfError(f"store {self.path} does not exist")
        if self.path.exists() and not self.path.is_dir():
            raise DitfError(f"store {self.path} is not a directory")
        try:
            self.root = zarr.open_group(str(self.path), mode="r" if read_only else "a")
        except Exception as exc:  # zarr raises several types for a non-store folder
            raise DitfError(f"cannot open store {self.path}: {exc}") from exc
        version = self.root.attrs.get("ditf_schema_version")
        if version is None and not read_only:
            try:
                self.root.attrs["ditf_schema_version"] = SCHEMA_VERSION
            except OSError as exc:
                raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc
        elif version is not None and version > SCHEMA_VERSION:
            raise DitfError(
                f"store {self.path} uses schema version {version}; this ditf reads up to {SCHEMA_VERSION}: upgrade ditf"
            )

    # ---- nodes ------------------------------------------------------------------------------
    def _group(self, path: str, create: bool) -> zarr.Group | None:
        try:
            return self.root[path] if not create else self.root.require_group(path)
        except KeyError:
            return None

    def has(self, path: str) -> bool:
        try:
            self.root[path]
            return True
        except KeyError:
            return False

    # ---- image index --------------------------------------------------------------------------
    @_writes
    def register_images(self, dataset: str, keys: Sequence[str], sizes: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Add images to the dataset's index (existing rows keep their position); key -> row."""
        group = self.root.require_group(f"{dataset}/images")
        with self.lock(f"{dataset}/images", f"another process is registering {dataset} images in {self.path}: retry"):
            return self._register_images(group, dataset, keys, sizes)

    def _register_images(self, group, dataset, keys, sizes) -> dict[str, int]:
        if "key" not in group:
            group.create_array("key", shape=(0,), chunks=(_INDEX_CHUNK,), dtype=str, fill_value="", dimension_names=("image",))
            group.create_array("size", shape=(0, 2), chunks=(_INDEX_CHUNK, 2), dtype="int32", fill_value=0, dimension_names=("image", "wh"))
        rows = self.image_rows(dataset)
        new = [(key, size) for key, size in zip(keys, sizes) if key not in rows]
        if new:
            start = len(rows)
            key_array, size_array = group["key"], group["size"]
            key_array.resize((start + len(new),))
            size_array.resize((start + len(new), 2))
            key_array[start:] = np.array([key for key, _ in new], dtype=object).astype(str)
            size_array[start:] = np.array([size for _, size in new], dtype="int32").reshape(-1, 2)
            rows.update({key: start + i for i, (key, _) in enumerate(new)})
        return rows

    def image_rows(self, dataset: str) -> dict[str, int]:
        group = self._group(f"{dataset}/images", create=False)
        if group is None or "key" not in group:
            return {}
        return {str(key): row for row, key in enumerate(group["key"][:])}

    # ---- features -----------------------------------------------------------------------------
    @_writes
    def open_features(
        self,
        dataset: str,
        model: str,
        k: int,
        t: int,
        config: Mapping | None = None,
        provenance: Mapping | None = None,
        n_images: int | None = None,
        grid_max: tuple[int, int] | None = None,
        hidden_size: int | None = None,
        modulation_names: Iterable[str] = (),
        adaln: bool = True,
    ) -> "FeatureArrays":
        """Open (or, with `config`, create/validate) the arrays of one (dataset, model, k, t).

        Writing into an existing key with a different `config` is refused, naming the settings
        that differ: silently mixing two configurations in one key would corrupt every score.
        With `adaln=False` (models without AdaLN: DINOv2, the SD UNet) no shift/scale/gate arrays
        are created, only `modulation_names` (normally none).
        """
        path = feature_path(dataset, model, k, t)
        group = self._group(path, create=False)
        if config is None:
            if group is None or "complete" not in group:
                raise DitfError(f"store {self.path} has no features for {path}: run `ditf extract` first")
            return FeatureArrays(group, path)
        config = _jsonable(config)
        if group is not None and "config" in group.attrs:
            differences = config_differences(group.attrs["config"], config)
            if differences:
                raise DitfError(
                    f"store {self.path} key {path} was written with another configuration ("
                    + "; ".join(differences)
                    + "): use another --store or the stored settings"
                )
        if self.read_only:
            raise DitfError(f"store {self.path} is read-only")
        group = self.root.require_group(path)
        if "complete" not in group:
            rows, cols = grid_max
            names = (["shift", "scale", "gate"] if adaln else []) + [*modulation_names]
            group.create_array(
                "pre_adaln", shape=(n_images, rows, cols, hidden_size), chunks=(1, rows, cols, hidden_size),
                dtype="float16", fill_value=0, compressors=_COMPRESSOR, dimension_names=("image", "row", "col", "channel"),
            )
            group.create_array("grid", shape=(n_images, 2), chunks=(1, 2), dtype="int32", fill_value=0, dimension_names=("image", "axis"))
            for name in names:
                group.create_array(name, shape=(n_images, hidden_size), chunks=(1, hidden_size), dtype="float32", fill_value=0, dimension_names=("image", "channel"))
            group.create_array("complete", shape=(n_images,), chunks=(1,), dtype=bool, fill_value=False, dimension_names=("image",))
            group.attrs.update({"config": config, "provenance": _jsonable(provenance or {}), "modulation": names})
        arrays = FeatureArrays(group, path)
        if n_images is not None and n_images > arrays.n_images:
            arrays.grow(n_images)
        return arrays

    @contextlib.contextmanager
    def lock(self, node: str, refusal: str):
        """Exclusive, non-blocking right to write one node; `refusal` is the error if taken.

        An advisory `flock` on the node's directory (zarr never replaces directories); the OS
        drops it when the process dies, so a crashed run never leaves a stale lock.
        """
        path = self.path / node
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DitfError(refusal) from None
            yield
        finally:
            os.close(fd)

    def writer_lock(self, dataset: str, model: str, k: int, t: int):
        """One extract per key at a time: a second writer is refused, not interleaved."""
        key = feature_path(dataset, model, k, t)
        return self.lock(key, f"another process is extracting {key} into {self.path}: wait for it to finish "
                              "(then rerun: completed images are skipped) or use another --store")

    def feature_keys(self, dataset: str | None = None) -> list[tuple[str, str, int, int]]:
        """Every (dataset, model, k, t) holding features."""
        found = []
        for ds_name, ds in self.root.groups():
            if (dataset is not None and ds_name != dataset) or ds_name == "prompts":
                continue
            for model_name, model in ds.groups():
                for k_name, k_group in model.groups():
                    for t_name, t_group in k_group.groups():
                        if k_name.startswith("k") and t_name.startswith("t") and "complete" in t_group:
                            found.append((ds_name, model_name, int(k_name[1:]), int(t_name[1:])))
        return sorted(found)

    def find_feature_key(self, dataset: str, model: str, k: int | None = None, t: int | None = None) -> tuple[int, int]:
        """(k, t) to use when the user gave none: the only one stored for (dataset, model)."""
        keys = [(kk, tt) for ds, m, kk, tt in self.feature_keys(dataset) if m == model]
        matching = [(kk, tt) for kk, tt in keys if (k is None or kk == k) and (t is None or tt == t)]
        if len(matching) == 1:
            return matching[0]
        if not matching:
            wanted = f"{dataset}/{model}" + (f"/k{k}" if k is not None else "") + (f"/t{t}" if t is not None else "")
            have = ", ".join(f"k{kk}/t{tt}" for kk, tt in keys) or "nothing"
            raise DitfError(f"store {self.path} has no features for {wanted} (it has {have} for {dataset}/{model}): run `ditf extract`")
        raise DitfError(
            f"store {self.path} holds several keys for {dataset}/{model} ("
            + ", ".join(f"k{kk}/t{tt}" for kk, tt in matching) + "): pass --k and --t"
        )

    # ---- prompt cache -----------------------------------------------------------------------
    def prompt_cache(self, model: str, identity: Mapping) -> "PromptCache":
        digest = hashlib.sha256(json.dumps(_jsonable(identity), sort_keys=True).encode()).hexdigest()[:10]
        path = f"prompts/{model}-{digest}"
        group = self._group(path, create=not self.read_only)
        if group is not None and not self.read_only and "identity" not in group.attrs:
            group.attrs["identity"] = _jsonable(identity)
        return PromptCache(group, read_only=self.read_only)

    # ---- predictions --------------------------------------------------------------------------
    @_writes
    def open_predictions(
        self,
        feature_key: tuple[str, str, int, int],
        name: str,
        pair_ids: Sequence[str] | None = None,
        max_kps: int | None = None,
        attrs: Mapping | None = None,
        block: int = 256,
        value_shape: tuple[int, ...] | None = None,
    ) -> "PredictionArrays":
        """Predictions of one variant/protocol next to the features they came from.

        One row per pair id: (max_kps, 2) keypoints by default, or `value_shape` (e.g. a 3x3
        homography for HPatches).
        """
        value_shape = tuple(value_shape) if value_shape is not None else (max_kps, 2)
        path = f"{feature_path(*feature_key)}/predictions/{name}"
        group = self._group(path, create=False)
        if pair_ids is None:
            if group is None or "done" not in group:
                raise DitfError(f"store {self.path} has no predictions {path}: run `ditf match` first")
            return PredictionArrays(group)
        attrs = _jsonable(attrs or {})
        if group is not None and "done" in group:
            differences = config_differences(group.attrs.get("config", {}), attrs)
            stored_ids = [str(p) for p in group["pair_id"][:]]
            if differences or stored_ids != list(pair_ids) or group["pred"].shape[1:] != value_shape:
                if differences:
                    reason = "; ".join(differences)
                else:
                    reason = "the pair list changed"
                raise DitfError(
                    f"predictions {path} exist with other settings ({reason}): pass --overwrite to recompute them"
                )
            return PredictionArrays(group)
        group = self.root.require_group(path)
        n = len(pair_ids)
        group.create_array("pair_id", shape=(n,), chunks=(max(n, 1),), dtype=str, fill_value="", dimension_names=("pair",))
        group["pair_id"][:] = np.array(list(pair_ids), dtype=object).astype(str)
        dims = ("pair", "keypoint", "xy") if len(value_shape) == 2 and value_shape[1] == 2 else (
            "pair", *(f"axis{i}" for i in range(len(value_shape))))
        group.create_array(
            "pred", shape=(n, *value_shape), chunks=(block, *value_shape), dtype="float32", fill_value=np.nan,
            compressors=_COMPRESSOR, dimension_names=dims,
        )
        group.create_array("done", shape=(n,), chunks=(block,), dtype=bool, fill_value=False, dimension_names=("pair",))
        group.attrs["config"] = attrs
        return PredictionArrays(group)

    def results_dir(self, feature_key: tuple[str, str, int, int], name: str) -> Path:
        """Folder for results that are files, not arrays (DAVIS masks): beside the store."""
        return self.path.with_suffix(".results") / feature_path(*feature_key) / name

    def prediction_groups(self, dataset: str, model: str, k: int, t: int) -> list[tuple[str, "PredictionArrays"]]:
        """Every stored predictions group of a feature key, as ("variant/protocol", arrays)."""
        group = self._group(f"{feature_path(dataset, model, k, t)}/predictions", create=False)
        if group is None:
            return []
        return [
            (f"{variant_name}/{protocol_name}", PredictionArrays(protocol_group))
            for variant_name, variant_group in sorted(group.groups())
            for protocol_name, protocol_group in sorted(variant_group.groups())
            if "done" in protocol_group
        ]

    def delete(self, path: str) -> None:
        if self.has(path):
            del self.root[path]


@dataclass
class FeatureArrays:
    """The arrays of one (dataset, model, k, t)."""

    group: zarr.Group
    path: str

    @property
    def n_images(self) -> int:
        return self.group["complete"].shape[0]

    @property
    def config(self) -> dict:
        return dict(self.group.attrs.get("config", {}))

    @property
    def hidden_size(self) -> int:
        """Channels of the cached features (D)."""
        return int(self.group["pre_adaln"].shape[-1])

    @property
    def modulation_names(self) -> list[str]:
        return list(self.group.attrs.get("modulation", ["shift", "scale", "gate"]))

    def grow(self, n_images: int) -> None:
        for name in ["pre_adaln", "grid", "complete", *self.modulation_names]:
            array = self.group[name]
            array.resize((n_images, *array.shape[1:]))

    def complete(self) -> np.ndarray:
        return np.asarray(self.group["complete"][:], dtype=bool)

    @_writes
    def write_image(self, row: int, pre_adaln: np.ndarray, modulation: Mapping[str, np.ndarray]) -> None:
        """Write one image's features, then mark it complete (the commit point)."""
        rows, cols = pre_adaln.shape[:2]
        capacity = self.group["pre_adaln"].shape[1:3]
        if rows > capacity[0] or cols > capacity[1]:
            raise DitfError(f"feature grid {rows}x{cols} exceeds the store's {capacity[0]}x{capacity[1]} for {self.path}")
        padded = np.zeros(self.group["pre_adaln"].shape[1:], dtype=np.float16)
        padded[:rows, :cols] = pre_adaln
        self.group["pre_adaln"][row] = padded
        self.group["grid"][row] = np.array([rows, cols], dtype="int32")
        for name in self.modulation_names:
            self.group[name][row] = np.asarray(modulation[name], dtype=np.float32)
        self.group["complete"][row] = True

    @property
    def massive_channels(self) -> list[int] | None:
        """The channel set `ditf analyze` recorded, if any."""
        stored = self.group.attrs.get("massive_channels")
        return None if stored is None else [int(c) for c in stored]

    @_writes
    def set_massive_channels(self, channels: Sequence[int], info: Mapping | None = None) -> None:
        """Record the detected massive channels (attribute `massive_channels`, read by `--channels auto`).

        `info` (e.g. the criterion and the images it was computed on) goes to `massive_channels_info`.
        """
        self.group.attrs["massive_channels"] = sorted(int(c) for c in channels)
        if info is not None:
            self.group.attrs["massive_channels_info"] = _jsonable(info)

    def read_image(self, row: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(pre_adaln of the valid grid, float16 (rows, cols, D); modulation name -> (D,))."""
        if not bool(self.group["complete"][row]):
            raise DitfError(f"image row {row} of {self.path} is not extracted yet: run `ditf extract`")
        rows, cols = (int(v) for v in self.group["grid"][row])
        pre_adaln = self.group["pre_adaln"][row, :rows, :cols]
        return pre_adaln, {name: self.group[name][row] for name in self.modulation_names}


class PromptCache:
    """Encoded prompts of one model, so text encoders run once per distinct prompt."""

    def __init__(self, group: zarr.Group | None, read_only: bool) -> None:
        self.group = group
        self.read_only = read_only

    def texts(self) -> dict[str, int]:
        if self.group is None or "text" not in self.group:
            return {}
        complete = self.group["complete"][:]
        return {str(text): row for row, text in enumerate(self.group["text"][:]) if complete[row]}

    def get(self, text: str) -> dict[str, np.ndarray] | None:
        row = self.texts().get(text)
        if row is None:
            return None
        names = self.group.attrs["names"]
        return {name: self.group[name][row] for name in names}

    def get_many(self, texts: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        rows = self.texts()
        names = self.group.attrs["names"] if self.group is not None and "names" in self.group.attrs else []
        return {text: {name: self.group[name][rows[text]] for name in names} for text in texts if text in rows}

    @_writes
    def put(self, text: str, embedding: Mapping[str, np.ndarray]) -> None:
        group = self.group
        if "text" not in group:
            group.create_array("text", shape=(0,), chunks=(_INDEX_CHUNK,), dtype=str, fill_value="")
            group.create_array("complete", shape=(0,), chunks=(1,), dtype=bool, fill_value=False)
            for name, value in embedding.items():
                group.create_array(name, shape=(0, *value.shape), chunks=(1, *value.shape), dtype="float32", fill_value=0, compressors=_COMPRESSOR)
            group.attrs["names"] = sorted(embedding)
        row = group["text"].shape[0]
        for name in ["text", "complete", *group.attrs["names"]]:
            array = group[name]
            array.resize((row + 1, *array.shape[1:]))
        for name in group.attrs["names"]:
            group[name][row] = np.asarray(embedding[name], dtype=np.float32)
        group["text"][row : row + 1] = np.array([text], dtype=object).astype(str)  # a 1-slice: numpy 1.x safe
        group["complete"][row] = True


@dataclass
class PredictionArrays:
    group: zarr.Group

    @property
    def pair_ids(self) -> list[str]:
        return [str(p) for p in self.group["pair_id"][:]]

    @property
    def config(self) -> dict:
        return dict(self.group.attrs.get("config", {}))

    def done(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    @_writes
    def write(self, start: int, predictions: Sequence[np.ndarray]) -> None:
        """Write a block of consecutive pairs, then mark them done."""
        block = np.full((len(predictions), *self.group["pred"].shape[1:]), np.nan, dtype=np.float32)
        for i, pred in enumerate(predictions):
            block[i, : len(pred)] = pred
        self.group["pred"][start : start + len(predictions)] = block
        self.group["done"][start : start + len(predictions)] = True

    def read_values(self) -> dict[str, np.ndarray]:
        """pair_id -> stored value as written (NaN padding kept), for pairs that are done."""
        done = self.done()
        values = self.group["pred"][:]
        return {pair_id: values[i] for i, pair_id in enumerate(self.pair_ids) if done[i]}

    def read(self) -> dict[str, np.ndarray]:
        """pair_id -> (N, 2) predictions (NaN rows stripped), for pairs that are done."""
        done = self.done()
        pred = self.group["pred"][:]
        out = {}
        for i, pair_id in enumerate(self.pair_ids):
            if done[i]:
                rows = pred[i]
                out[pair_id] = rows[~np.isnan(rows[:, 0])]
        return out
