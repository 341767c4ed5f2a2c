"""The store audit `ditf doctor` runs: every node walked, every committed chunk read, nothing changed.

`audit_store` walks a store through its layout (`layout.StoreLayout`) and returns the lines that
are fine and the findings; each finding carries its repair, which `ditf doctor --repair` runs on
a writable store. Repairs remove half-done setups and unreadable nodes and un-commit damaged
images and blocks, so that a rerun redoes only those; they never delete intact committed data.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import DitfError
from ..core.keys import FeatureKey
from .arrays import FeatureArrays, PredictionArrays, chunk_exists
from .backends import Backend, ReadBackend, backend_for, store_location
from .failures import reason
from .feature_store import FeatureStore
from .layout import IMAGES, PREDICTIONS_OF, node_kind
from .schema import FEATURE_DTYPES, MODULATION_DTYPE, SCHEMA_VERSION, file_rows, root_metadata, writable

__all__ = ["Finding", "audit_store", "repair_root_metadata"]


@dataclass
class Finding:
    """One problem in a store, and what `ditf doctor --repair` does about it."""

    problem: str
    repair: str = "no automatic repair"
    #: the repair; one that returns False could not be done yet (a writer still lives)
    action: Callable[[], object] | None = field(default=None, repr=False)
    harmless: bool = False  # reported and repaired, but nothing reads it (not counted as a problem)


def _metadata_problem(backend: ReadBackend, rel: str) -> str | None:
    """Why a zarr.json cannot be trusted (unparsable, not a zarr v3 node), or None."""
    try:
        meta = json.loads(backend.read_text(rel))
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") not in ("group", "array"):
            return "not zarr v3 metadata"
        if meta["node_type"] == "array" and not isinstance(meta.get("data_type"), (str, dict)):
            return "no data type"
    except (OSError, UnicodeDecodeError, ValueError, DitfError) as exc:
        return reason(exc)
    return None


def repair_root_metadata(path: str | Path) -> str | None:
    """Rewrite a store's unreadable root zarr.json (it holds only the schema version); what was done, or None."""
    location = store_location(path)
    backend = backend_for(location)
    if not backend.exists("zarr.json") or _metadata_problem(backend, "zarr.json") is None:
        return None
    backend.write_text("zarr.json", root_metadata().decode())
    return f"rewrote the root metadata of {location} (schema version {SCHEMA_VERSION})"


#: what a consolidated entry must agree on with the node's own zarr.json
_CONSOLIDATED_FIELDS = ("node_type", "shape", "data_type", "chunk_grid", "codecs", "fill_value", "attributes")


class _Audit:
    """One walk: the findings so far, and the nodes its repairs remove (each once)."""

    def __init__(self, store: FeatureStore, read_chunks: bool) -> None:
        self.store, self.read_chunks = store, read_chunks
        self.fs = store.backend
        self.ok: list[str] = []
        self.findings: list[Finding] = []
        self.damaged: list[str] = []  # nodes whose metadata is damaged: nothing below them is opened
        self._removed: set[str] = set()

    def remove(self, node: str, why: str) -> Finding:
        """A finding whose repair removes `node` whole."""
        def act() -> None:
            if node not in self._removed:
                self._removed.add(node)
                self.fs.remove(node)
        return Finding(why, f"removed {node}", act)

    def under_damage(self, node: str) -> bool:
        return any(node == d or node.startswith(d + "/") or d.startswith(node + "/") for d in self.damaged)

    # 1. leftovers of writers (never visible to readers): a dead writer's are litter, not damage,
    # and a live writer's are its work in progress, so they are notes; a repair removes them only
    # once no writer lives (`writers.sweep`), as every writer does when it starts alone
    def leftovers(self) -> None:
        fs = self.fs
        if not isinstance(fs, Backend):
            return  # a published store: nothing ever wrote there through ditf, so nothing was left half-done
        sweep = self.store.sweep_if_alone
        for staged in self.store.layout.staging():
            self.findings.append(Finding(f"store: unfinished setup of a running or interrupted writer: {fs.where(staged)}",
                                         f"removed {fs.where(staged)}", sweep, harmless=True))
        for sibling, discard in fs.stray_creations():
            self.findings.append(Finding(f"store: unfinished store creation left by an interrupted run: {sibling}",
                                         f"removed {sibling}", discard, harmless=True))
        for partial, _ in fs.partial_files():
            self.findings.append(Finding(f"store: leftover of a write interrupted by a crash: {partial}",
                                         f"removed {partial}", sweep, harmless=True))

    # 1b. a consolidated copy that no longer matches the nodes (edited by hand, or written by
    # another tool while ditf wrote): readers would trust it
    def consolidated(self) -> None:
        stale = self._stale_consolidated()
        if stale:
            self.findings.append(Finding(
                f"store: the consolidated metadata in the root zarr.json is stale ({stale}); "
                "readers would see the store as it was",
                "dropped the consolidated metadata (the next ditf writer writes it anew)", self.store.drop_consolidated))

    def _stale_consolidated(self) -> str | None:
        """How the root's consolidated metadata differs from the nodes' own, or None (or no copy)."""
        fs = self.fs
        try:
            copy = (json.loads(fs.read_text("zarr.json")).get("consolidated_metadata") or {}).get("metadata")
        except (OSError, ValueError, AttributeError):
            return None  # no copy, or a damaged root (reported below)
        if copy is None:
            return None
        on_disk = {node for node in self.store.layout.nodes() if node}
        missing, extra = sorted(on_disk - set(copy)), sorted(set(copy) - on_disk)
        if missing or extra:
            return f"{len(missing)} node(s) missing from it, e.g. {missing[0]}" if missing else \
                f"{len(extra)} node(s) no longer in the store, e.g. {extra[0]}"
        for node, entry in copy.items():
            try:
                own = json.loads(fs.read_text(f"{node}/zarr.json"))
            except (OSError, ValueError):
                continue  # a damaged node: reported on its own below
            differs = [key for key in _CONSOLIDATED_FIELDS if key in own and own.get(key) != entry.get(key)]
            if differs:
                return f"{node}: {', '.join(differs)} differ"
        return None

    # 2. every node's metadata parses (a damaged zarr.json must not crash the walk)
    def metadata(self) -> None:
        fs = self.fs
        for node in self.store.layout.nodes():
            rel = tuple(node.split("/")) if node else ()
            meta = f"{node}/zarr.json" if node else "zarr.json"
            why = _metadata_problem(fs, meta)
            if why is None:
                continue
            self.damaged.append(node)
            kind = node_kind(rel)
            problem = f"store: the metadata of {node or 'the root'} is damaged ({why})"
            if kind == "root":
                self.findings.append(Finding(problem, "rewrote the root metadata",
                                             functools.partial(repair_root_metadata, self.store.path)))
            elif kind == "key":
                self.findings.append(self.remove("/".join(rel[:4]), problem + "; the key's layout or configuration is "
                                                 "lost, its images will be extracted again"))
            elif kind == "predictions":
                self.findings.append(self.remove("/".join(rel[:8] if len(rel) >= 8 else rel[:7]),
                                                 problem + "; predictions are recomputed by `ditf match`"))
            elif kind == "prompt":
                self.findings.append(self.remove("/".join(rel[:3] if len(rel) >= 3 else rel[:2]),
                                                 problem + "; prompts are encoded again"))
            elif kind == "intermediate":
                def rewrite(path: str = meta) -> None:
                    fs.write_text(path, json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
                self.findings.append(Finding(problem, f"rewrote {node}/zarr.json as a plain group", rewrite))
            else:
                self.findings.append(Finding(problem + "; every key's rows depend on the image index"))

    # 3. feature keys: complete setups, dtypes, every committed image readable
    def keys(self) -> None:
        store = self.store
        for ds in store.layout.datasets():
            if self.under_damage(f"{ds}/images"):
                continue
            try:
                rows = store.image_rows(ds)
                self.ok.append(f"store: {ds}/images: {len(rows)} images indexed")
                mark = store.registration_mark(ds)
            except DitfError as exc:
                self.findings.append(self._damaged_index(ds, exc))
                continue
            if mark is not None:
                self.findings.append(self._registration_mark(ds, mark))
            for key in store.layout.key_folders(ds):
                if self.under_damage(key.path) or not self.fs.list(key.path):
                    continue  # an empty folder (a schema-1 lock): nothing to report
                self.key(key)

    def _registration_mark(self, ds: str, mark: dict) -> Finding:
        """An image registration's claim that was never committed (S3): a running registration's,
        or a killed writer's. Readers go by the committed `count`, so it hides nothing; the next
        registration (a repair registers no image, which clears it) removes it."""
        at = mark.get("at")
        when = f" at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(at))}" if isinstance(at, (int, float)) else ""
        who = f" by {mark['host']}:{mark['pid']}" if "host" in mark and "pid" in mark else ""
        return Finding(f"store: {ds}/images: an image registration's claim{who}{when} was never committed "
                       "(its writer is still registering, or was killed)",
                       f"cleared the registration claim of {ds}/images",
                       functools.partial(self.store.register_images, ds, [], []), harmless=True)

    def _damaged_index(self, ds: str, exc: DitfError) -> Finding:
        """The image index of `ds` cannot be read: which of its chunks, and the repair that keeps
        the rest (the lost rows become placeholders no image name matches, un-committed in every
        key of the dataset, so the next extract registers those images anew and extracts them)."""
        group = self.store.group(f"{ds}/{IMAGES}")
        damaged: list[tuple[int, int]] = []
        try:
            for name in ("key", "size"):
                array = group[name]
                step = array.chunks[0]
                for start in range(0, array.shape[0], step):
                    stop = min(start + step, array.shape[0])
                    try:
                        array[start:stop]
                    except Exception:
                        damaged.append((start, stop))
        except Exception:  # the index's metadata itself: nothing to keep
            damaged = []
        if not damaged:
            return Finding(f"store: {ds}/images: {exc}; every key of {ds} depends on it: extract {ds} into a new "
                           "--store (its features cannot be told apart without the index)")
        spans = ", ".join(f"{a}..{b - 1}" for a, b in sorted(set(damaged)))
        return Finding(
            f"store: {ds}/images: the image index rows {spans} are damaged ({reason(exc.__cause__ or exc)})",
            f"un-committed rows {spans} in every key of {ds} and rewrote them as lost rows: the next extract "
            "registers and extracts those images again, the other rows are kept",
            functools.partial(self._repair_index, ds, sorted(set(damaged))))

    def _repair_index(self, ds: str, spans: Sequence[tuple[int, int]]) -> None:
        """Un-commit the rows of `spans` in every key of `ds`, then rewrite them as placeholders."""
        lost = [row for a, b in spans for row in range(a, b)]
        for key in self.store.layout.feature_keys(ds):
            arrays = self.store.feature_arrays(key)
            arrays.clear_complete([row for row in lost if row < arrays.n_images])
        group = self.store.group(f"{ds}/{IMAGES}")
        for a, b in spans:
            writable(group["key"])[a:b] = np.array([f"<lost row {row}>" for row in range(a, b)], dtype=object).astype(str)
            writable(group["size"])[a:b] = np.zeros((b - a, 2), dtype="int32")

    def key(self, key: FeatureKey) -> None:
        node, fs, store = key.path, self.fs, self.store
        group = store.group(node) if fs.exists(f"{node}/zarr.json") else None
        if group is not None and PREDICTIONS_OF in group.attrs and "complete" not in group:
            self.ok.append(f"store: {node}: predictions of the features in {group.attrs[PREDICTIONS_OF]}")
            for path in store.layout.prediction_folders(key):
                self.predictions(path)
            return
        if group is None or "complete" not in group or "config" not in group.attrs or "modulation" not in group.attrs:
            committed = 0
            try:
                committed = int(np.asarray(group["complete"][:]).sum()) if group is not None and "complete" in group else 0
            except Exception:
                pass
            note = "" if not committed else f" ({committed} committed images without a trustworthy configuration are extracted again)"
            self.findings.append(self.remove(node, f"store: {node}: half-done setup of a feature key{note}"))
            return
        if self._wrong_dtypes(node, group.attrs["modulation"]):
            return
        try:
            arrays = store.feature_arrays(key)
            n = arrays.n_images
            short = [name for name in ["pre_adaln", "grid", *arrays.modulation_names] if group[name].shape[0] < n]
            if short:
                raise DitfError(f"arrays {', '.join(short)} have fewer rows than complete")
        except DitfError as exc:
            self.findings.append(self.remove(node, f"store: {node}: {exc}; its images are extracted again"))
            return
        complete = self._readable_complete(arrays, node)
        broken = self._committed_images(arrays, node, complete) if self.read_chunks else set()
        self.ok.append(f"store: {node}: {int(complete.sum()) - len(broken)}/{len(complete)} images complete and readable")
        for path in store.layout.prediction_folders(key):
            self.predictions(path)

    def _wrong_dtypes(self, node: str, modulation: Sequence[str]) -> bool:
        """A finding per array whose metadata names another dtype than the schema's; True if any."""
        fs = self.fs
        expected = {**FEATURE_DTYPES, **{name: MODULATION_DTYPE for name in modulation}}
        wrong = False
        for name, dtype in expected.items():
            meta = f"{node}/{name}/zarr.json"
            stored = json.loads(fs.read_text(meta)).get("data_type") if fs.exists(meta) else None
            if stored is None or stored == dtype:
                continue
            wrong = True

            def restore(meta: str = meta, dtype: str = dtype) -> None:  # the chunks' checksums then vouch for the bytes
                fixed = {**json.loads(fs.read_text(meta)), "data_type": dtype}
                if dtype == "bool":
                    fixed["fill_value"] = bool(fixed.get("fill_value") or False)
                fs.write_text(meta, json.dumps(fixed, indent=2))

            self.findings.append(Finding(f"store: {node}: array {name} has dtype {stored} in its metadata, not {dtype}",
                                         f"restored the dtype of {node}/{name} to {dtype}", restore))
        return wrong

    def _readable_complete(self, arrays: FeatureArrays, node: str) -> np.ndarray:
        """The commit flags, file by file: a damaged file of `complete` costs the images it holds
        (the repair removes it, so they count as not extracted), never the whole key."""
        array = arrays.group["complete"]
        step, n = file_rows(array), array.shape[0]
        flags = np.zeros(n, dtype=bool)
        for start in range(0, n, step):
            stop = min(start + step, n)
            try:
                flags[start:stop] = np.asarray(array[start:stop], dtype=bool)
            except Exception as exc:
                self.findings.append(Finding(
                    f"store: {node}: the complete flags of images {start}..{stop - 1} are damaged ({reason(exc)})",
                    f"removed that file of {node}/complete: the next extract redoes those images",
                    functools.partial(arrays.drop_rows, [], "complete", start)))
        return flags

    def _committed_images(self, arrays: FeatureArrays, node: str, complete: np.ndarray) -> set[int]:
        """Read every committed image; the rows found broken (each with its finding)."""
        broken: set[int] = set()
        n = len(complete)
        # a damaged shard of a small array (its index or an image's chunk): the whole file goes,
        # with the commit of every image it held (a later write into it could not read it back)
        for name in ["grid", *arrays.modulation_names]:
            array = arrays.group[name]
            step = file_rows(array)
            if step == 1:
                continue  # one chunk per image (schema 2): checked image by image below
            for start in range(0, n, step):
                stop = min(start + step, n)
                committed = [int(r) for r in complete[start:stop].nonzero()[0] + start]
                exists = chunk_exists(array, start)
                if not committed and not exists:
                    continue
                try:
                    if not exists:
                        raise DitfError("its file is missing")
                    array[start:stop]
                except Exception as exc:
                    if exists and self._damaged_inside(arrays, node, name, start, stop, committed, broken):
                        continue
                    broken.update(committed)
                    self.findings.append(Finding(
                        f"store: {node}: the {name} file of images {start}..{stop - 1} is damaged ({reason(exc)}); "
                        f"{len(committed)} committed images lose their AdaLN vectors or grid",
                        f"cleared the complete flag of those {len(committed)} images and removed that file of {node}/{name}: "
                        "the next extract redoes them",
                        functools.partial(arrays.drop_rows, committed, name, start)))
        for row in map(int, complete.nonzero()[0]):
            if row in broken:
                continue
            try:
                arrays.read_image(row)
            except DitfError as exc:
                broken.add(row)
                self.findings.append(Finding(
                    f"store: {node}: committed image {arrays.name_of(row)} is unreadable ({exc})",
                    f"cleared the complete flag of {arrays.name_of(row)} in {node}: the next extract redoes it",
                    functools.partial(arrays.clear_complete, [row])))
        return broken

    def _damaged_inside(self, arrays: FeatureArrays, node: str, name: str, start: int, stop: int,
                        committed: Sequence[int], broken: set[int]) -> bool:
        """A file whose index reads but some images' chunks do not: a finding that costs those
        images only (the repair rewrites the file without them). False when no image reads (a
        damaged index: the whole file goes)."""
        array = arrays.group[name]
        intact, damaged = {}, []
        for row in range(start, stop):
            try:
                intact[row] = np.asarray(array[row])
            except Exception:
                damaged.append(row)
        if not intact or not damaged:
            return False
        lost = [row for row in committed if row in damaged]
        broken.update(lost)
        names = ", ".join(arrays.name_of(row) for row in damaged)
        self.findings.append(Finding(
            f"store: {node}: the {name} chunks of images {names} are damaged inside an intact file; "
            f"{len(lost)} committed images lose their {name} vector",
            f"cleared the complete flag of those {len(lost)} images and rewrote that file of {node}/{name} without "
            f"them, keeping its {len(intact)} intact images: the next extract redoes only those {len(lost)}",
            functools.partial(arrays.rewrite_without, lost, name, start, stop, intact)))
        return True

    def predictions(self, path: str) -> None:
        group = self.store.group(path) if self.fs.exists(f"{path}/zarr.json") else None
        if group is None or not all(name in group for name in ("pair_id", "pred", "done")):
            self.findings.append(self.remove(path, f"store: {path}: half-done predictions setup; `ditf match` recomputes it"))
            return
        predictions = PredictionArrays(group, path)
        try:
            done = predictions.done()
            bad = predictions.damaged_blocks()
            if str(group["pred"].dtype) != "float32" or str(group["done"].dtype) != "bool":
                raise DitfError("wrong dtype in the metadata")
        except DitfError as exc:
            self.findings.append(self.remove(path, f"store: {path}: {exc}; `ditf match` recomputes it"))
            return
        for start, stop, why in bad:
            self.findings.append(Finding(f"store: {path}: pairs {start}..{stop - 1} are damaged ({why})",
                                         f"cleared done for pairs {start}..{stop - 1} of {path}: the next match redoes them",
                                         functools.partial(predictions.clear_done, start, stop)))
        self.ok.append(f"store: {path}: {int(done.sum())}/{len(done)} pairs done")

    # 4. prompt caches: every entry readable
    def prompts(self) -> None:
        fs = self.fs
        for node in self.store.layout.prompt_entries():
            if self.under_damage(node):
                continue
            meta = f"{node}/zarr.json"
            if not fs.exists(meta) or json.loads(fs.read_text(meta)).get("node_type") != "group":
                continue  # a schema-1 prompt array (read by nobody now)
            group = self.store.group(node)
            if group is None or "text" not in group.attrs:
                continue  # a schema-1 prompt array: read by nobody, harmless
            try:
                for name in group.attrs["names"]:
                    group[name][...]
            except Exception as exc:
                self.findings.append(self.remove(node, f"store: prompt cache entry {node} is damaged ({reason(exc)}); "
                                                       "it is encoded again"))


def audit_store(store: FeatureStore, *, read_chunks: bool = True) -> tuple[list[str], list[Finding]]:
    """Walk a store: metadata, half-done setups, every committed image's and block's chunks.

    Returns (lines that are fine, findings). Nothing is changed: each finding carries the
    repair action, run by the caller (`ditf doctor --repair`) on a writable store.
    """
    audit = _Audit(store, read_chunks)
    audit.leftovers()
    audit.consolidated()
    audit.metadata()
    if "" in audit.damaged:
        return audit.ok, audit.findings  # nothing below can be opened until the root is repaired
    audit.keys()
    audit.prompts()
    return audit.ok, audit.findings
