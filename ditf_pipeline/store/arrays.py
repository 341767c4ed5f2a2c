"""The array views of one feature key and of one predictions group: commit marks, reads, writes.

`FeatureArrays` (one (dataset, model, k, t)) and `PredictionArrays` (one variant/protocol of one
pair list) hold an opened zarr group. An image is committed by its `complete` flag, written
after all its chunks; a block of pairs by its `done` chunk. A committed item whose chunk is
missing or damaged is a one-line error naming it, never fill values or wrong numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.sync import sync

from ..core.errors import DitfError
from . import legacy
from .failures import reason, writes
from .file_rows import FileRows, chunk_exists
from .schema import FEATURE_DTYPES, MODULATION_DTYPE, file_key, jsonable, writable

__all__ = ["FeatureArrays", "PredictionArrays", "chunk_exists"]


@dataclass
class FeatureArrays:
    """The arrays of one (dataset, model, k, t)."""

    group: zarr.Group
    path: str
    image_key: Callable[[int], str] | None = field(default=None, repr=False)
    #: opened arrays and recently read shards of the small arrays, for `read_image`
    _rows: FileRows = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._rows = FileRows(self.group)

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
        return list(self.group.attrs.get("modulation", legacy.MODULATION_OF_SCHEMA_1))

    def name_of(self, row: int) -> str:
        """The image key of `row`, for messages (a damaged image is named, not numbered)."""
        return self.image_key(row) if self.image_key is not None else f"row {row}"

    def check_schema(self) -> None:
        """Every array present with its dtype: damaged metadata must not reinterpret the bytes.

        Raises
        ------
        DitfError
            Naming the missing array or the wrong dtype.
        """
        expected = {**FEATURE_DTYPES, **{name: MODULATION_DTYPE for name in self.modulation_names}}
        for name, dtype in expected.items():
            if name not in self.group:
                raise DitfError(f"{self.path}: array {name} is missing: run `ditf doctor --repair`")
            stored = str(self.group[name].dtype)
            if stored != dtype:
                raise DitfError(f"{self.path}: array {name} has dtype {stored} in its metadata, not {dtype}: "
                                "the metadata is damaged; run `ditf doctor --repair`")

    def grow(self, n_images: int) -> None:
        """More rows; `complete` last, so its length never exceeds any other array's."""
        self._rows.clear()
        for name in ["pre_adaln", "grid", *self.modulation_names, "complete"]:
            array = self.group[name]
            if array.shape[0] != n_images:
                array.resize((n_images, *array.shape[1:]))

    def complete(self) -> np.ndarray:
        """The commit flag of every image."""
        try:
            return np.asarray(self.group["complete"][:], dtype=bool)
        except Exception as exc:
            raise DitfError(f"store: {self.path}: array complete is damaged ({reason(exc)}): run `ditf doctor --repair`") from exc

    @writes
    def write_image(self, row: int, pre_adaln: np.ndarray, modulation: Mapping[str, np.ndarray]) -> None:
        """Write one image's features, then mark it complete (the commit point)."""
        rows, cols = pre_adaln.shape[:2]
        capacity = self.group["pre_adaln"].shape[1:3]
        if rows > capacity[0] or cols > capacity[1]:
            raise DitfError(f"feature grid {rows}x{cols} exceeds the store's {capacity[0]}x{capacity[1]} for {self.path}")
        self._rows.clear()  # a rewritten row must not be read from a shard cached before
        padded = np.zeros(self.group["pre_adaln"].shape[1:], dtype=np.float16)
        padded[:rows, :cols] = pre_adaln
        writable(self.group["pre_adaln"])[row] = padded
        writable(self.group["grid"])[row] = np.array([rows, cols], dtype="int32")
        for name in self.modulation_names:
            writable(self.group[name])[row] = np.asarray(modulation[name], dtype=np.float32)
        writable(self.group["complete"])[row] = True

    def clear_complete(self, rows: Iterable[int]) -> None:
        """Un-commit images (the doctor's repair of a damaged image): the next extract redoes them."""
        self._rows.clear()
        complete = writable(self.group["complete"])
        for row in rows:
            complete[int(row)] = False

    @writes
    def drop_rows(self, committed: Iterable[int], name: str, row: int) -> None:
        """Un-commit `committed`, then delete the file of array `name` holding `row` (a damaged
        shard: zarr cannot write into a shard whose index it cannot read)."""
        self.clear_complete(committed)
        array = self.group[name]
        sync(array.store_path.store.delete(file_key(array, row)))

    def rewrite_without(self, lost: Iterable[int], name: str, start: int, stop: int,
                        intact: Mapping[int, np.ndarray]) -> None:
        """Un-commit `lost`, then rewrite the file of array `name` holding rows `start:stop` with
        only its `intact` rows (the others as never written): damage inside one image's chunk of
        a shard costs that image only.

        The file is replaced whole by one write (zarr writes a shard it covers completely without
        reading the damaged one), so a kill leaves the damaged file or the repaired one.
        """
        self.clear_complete(lost)
        array = self.group[name]
        block = np.full((stop - start, *array.shape[1:]), array.fill_value, dtype=array.dtype)
        for row, value in intact.items():
            block[row - start] = value
        try:
            array[start:stop] = block
        except Exception:  # (a last, partial shard may be read first: remove it, then write)
            sync(array.store_path.store.delete(file_key(array, start)))
            array[start:stop] = block

    @property
    def massive_channels(self) -> list[int] | None:
        """The channel set `ditf analyze` recorded, if any."""
        stored = self.group.attrs.get("massive_channels")
        return None if stored is None else [int(c) for c in stored]

    @writes
    def set_massive_channels(self, channels: Sequence[int], info: Mapping | None = None) -> None:
        """Record the detected massive channels (attribute `massive_channels`, read by `--channels auto`).

        `info` (e.g. the criterion and the images it was computed on) goes to `massive_channels_info`.
        """
        attrs = {"massive_channels": sorted(int(c) for c in channels)}
        if info is not None:
            attrs["massive_channels_info"] = jsonable(info)
        # one metadata write: `attrs.update` would write zarr.json once per key, and a kill between
        # the two would leave the channels without their info (found by tests/test_kill_points.py)
        self.group.update_attributes(attrs)

    def _read_row(self, name: str, row: int, selection: tuple = ()) -> np.ndarray:
        """One image's slice of one array; a missing or damaged chunk is an error naming both."""
        try:
            array = self._rows.array(name)
            if not chunk_exists(array, row):
                raise DitfError(f"store: {self.path}: the {name} chunk of committed image {self.name_of(row)} is missing; "
                                "run `ditf doctor --repair`, then rerun `ditf extract`")
            return array[(row, *selection)]
        except DitfError:
            raise
        except Exception as exc:
            raise DitfError(f"store: {self.path}: the {name} chunk of image {self.name_of(row)} is damaged ({reason(exc)}); "
                            "run `ditf doctor --repair`, then rerun `ditf extract`") from exc

    def _small_row(self, name: str, row: int, written: Callable[[np.ndarray], bool]) -> np.ndarray:
        """Row `row` of a small per-image array from its shard read whole (`FileRows`); a row
        that is not `written` there (a fill value), or a shard that cannot be read whole, is read
        alone, as ever, with its own error."""
        value = self._rows.row(name, row)
        return value if value is not None and written(value) else self._read_row(name, row)

    def read_image(self, row: int, vectors: Iterable[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(pre_adaln of the valid grid, float16 (rows, cols, D); modulation name -> (D,)).

        `vectors` names the AdaLN vectors to read (default: all stored); a variant needs at most
        two. The commit flag, grid and vectors come from their shards, each read once for the
        images that share it (`FileRows`); the features are one chunk per image.

        Raises
        ------
        DitfError
            When the image is not committed, or one of its chunks is missing or damaged.
        """
        try:
            committed = bool(self._small_row("complete", row, bool))
        except DitfError:
            raise
        except Exception as exc:
            raise DitfError(f"store: {self.path}: array complete is damaged ({reason(exc)}): run `ditf doctor --repair`") from exc
        if not committed:
            raise DitfError(f"image {self.name_of(row)} of {self.path} is not extracted yet: run `ditf extract`")
        rows, cols = (int(v) for v in self._small_row("grid", row, lambda grid: bool(np.all(grid > 0))))
        capacity = self._rows.array("pre_adaln").shape[1:3]
        if not (0 < rows <= capacity[0] and 0 < cols <= capacity[1]):
            raise DitfError(f"store: {self.path}: the grid of image {self.name_of(row)} is damaged ({rows}x{cols}); "
                            "run `ditf doctor --repair`")
        pre_adaln = self._read_row("pre_adaln", row, (slice(0, rows), slice(0, cols)))
        wanted = None if vectors is None else set(vectors)
        names = [n for n in self.modulation_names if wanted is None or n in wanted]
        modulation = {name: self._small_row(name, row, lambda vector: not np.isnan(vector).all()) for name in names}
        for name, vector in modulation.items():
            if np.isnan(vector).all():  # the NaN fill: this image's chunk is absent from its shard
                raise DitfError(f"store: {self.path}: the {name} vector of committed image {self.name_of(row)} is missing; "
                                "run `ditf doctor --repair`, then rerun `ditf extract`")
        return pre_adaln, modulation


@dataclass
class PredictionArrays:
    """One predictions group: `pair_id`, `pred` (NaN padded) and the `done` flag of each pair."""

    group: zarr.Group
    path: str = ""

    @property
    def pair_ids(self) -> list[str]:
        return [str(p) for p in self.group["pair_id"][:]]

    @property
    def config(self) -> dict:
        return dict(self.group.attrs.get("config", {}))

    def done(self) -> np.ndarray:
        """The commit flag of every pair."""
        try:
            return np.asarray(self.group["done"][:], dtype=bool)
        except Exception as exc:
            raise DitfError(f"store: predictions {self.path}: array done is damaged ({reason(exc)}): "
                            "run `ditf doctor --repair`") from exc

    @writes
    def write(self, start: int, predictions: Sequence[np.ndarray]) -> None:
        """Write a block of consecutive pairs, then mark them done."""
        block = np.full((len(predictions), *self.group["pred"].shape[1:]), np.nan, dtype=np.float32)
        for i, pred in enumerate(predictions):
            block[i, : len(pred)] = pred
        writable(self.group["pred"])[start : start + len(predictions)] = block
        writable(self.group["done"])[start : start + len(predictions)] = True

    def clear_done(self, start: int, stop: int) -> None:
        """Un-commit a block of pairs (the doctor's repair of a damaged block)."""
        writable(self.group["done"])[start:stop] = False

    def damaged_blocks(self) -> list[tuple[int, int, str]]:
        """(start, stop, reason) of every block with done pairs whose `pred` chunk is missing or damaged."""
        done = self.done()
        pred = self.group["pred"]
        block = pred.chunks[0]
        bad = []
        for start in range(0, len(done), block):
            if not done[start : start + block].any():
                continue
            try:
                if not chunk_exists(pred, start):
                    bad.append((start, min(start + block, len(done)), "chunk missing"))
                    continue
                pred[start : start + block]
            except Exception as exc:
                bad.append((start, min(start + block, len(done)), reason(exc)))
        return bad

    def _values(self) -> np.ndarray:
        bad = self.damaged_blocks()
        if bad:
            start, stop, why = bad[0]
            raise DitfError(f"store: predictions {self.path}: pairs {start}..{stop - 1} are damaged ({why}): "
                            "run `ditf doctor --repair`, then rerun `ditf match`")
        return self.group["pred"][:]

    def read_values(self) -> dict[str, np.ndarray]:
        """pair_id -> stored value as written (NaN padding kept), for pairs that are done."""
        done = self.done()
        values = self._values()
        return {pair_id: values[i] for i, pair_id in enumerate(self.pair_ids) if done[i]}

    def read(self) -> dict[str, np.ndarray]:
        """pair_id -> (N, 2) predictions (NaN rows stripped), for pairs that are done."""
        done = self.done()
        pred = self._values()
        out = {}
        for i, pair_id in enumerate(self.pair_ids):
            if done[i]:
                rows = pred[i]
                out[pair_id] = rows[~np.isnan(rows[:, 0])]
        return out
