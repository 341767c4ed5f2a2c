"""`FeatureStore`: the store's facade, one object per opened store (the only zarr user of ditf).

What it holds (Zarr v3, layout in `layout`, schema in `schema`, documented in stores/README.md):
an image index per dataset, feature keys (`FeatureArrays`), predictions (`PredictionArrays`) and
a prompt cache (`PromptCache`). The pieces it composes, one concern each:

* `backends`: where the store lives (a folder, an object store) and how a node is published,
  removed and locked there;
* `writers`: this process among the store's writers, and the consolidated metadata the last
  one writes;
* `legacy`: stores of older schemas, read as they are and migrated;
* `faults`: the crash tests' kill points, installed only when armed by its environment.

Crash safety, in three rules:

* every multi-write setup (the root, a feature key, a predictions group, a prompt, the image
  index group) is built under `.ditf/staging/` and published whole (`staged`, `publish`);
* appending to the image index writes rows past the committed `count`, then `count` (one write);
* an image (a block of pairs) is committed by its `complete` (`done`) chunk, written after its
  data chunks; every single file write is atomic.

So a SIGKILL before any single write leaves a store that the next plain run completes into the
same store an uninterrupted run writes (tests/test_kill_points.py tries every write of the setup).
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import zarr

from ..core.errors import DitfError
from ..core.keys import FeatureKey
from . import image_index, leases, legacy, locks, writers
from .arrays import FeatureArrays, PredictionArrays
from .backends import Backend, ReadBackend, backend_for, is_read_only, is_remote, local_beside, store_location
from .failures import reads, reason, writes
from .layout import IMAGES, META, PREDICTIONS, PREDICTIONS_OF, StoreLayout, lock_path, prediction_scope
from .prompts import PromptCache, prompt_cache_path
from .schema import (
    ROWS_PER_SHARD,
    SCHEMA_VERSION,
    config_differences,
    refuse_other_config,
    create_feature_arrays,
    create_index_arrays,
    create_prediction_arrays,
    jsonable,
    root_metadata,
)
from .writers import close_writers

if TYPE_CHECKING:
    from .backends.object import ObjectBackend

__all__ = ["ROWS_PER_SHARD", "FeatureArrays", "FeatureStore", "PredictionArrays", "PromptCache", "close_writers",
           "config_differences", "feature_path", "is_read_only", "is_remote", "local_beside", "prediction_scope", "store_exists",
           "store_folder_exists", "store_location"]

#: how long a writer waits for the image index's lock (a registration appends a few rows;
#: only a stuck writer holds it longer)
_INDEX_LOCK_WAIT = 300.0
def store_exists(store: str | Path) -> bool:
    """Whether a ditf store (its root zarr.json) is at `store` (a path or a URL)."""
    backend = backend_for(store_location(store))
    if not isinstance(backend, Backend):  # a published store: its one metadata read says
        return backend.root_problem(read_only=True) is None
    return backend.exists("zarr.json")


def store_folder_exists(store: str | Path) -> bool:
    """Whether anything is at `store` (a folder; under an object-store prefix, any object)."""
    return backend_for(store_location(store)).exists("")


def feature_path(dataset: str, model: str, k: int, t: int) -> str:
    """The group of a feature key (see `FeatureKey.path`)."""
    return FeatureKey(dataset, model, k, t).path


class FeatureStore:
    """A Zarr group holding cached DiT features, prompt embeddings and predictions."""

    def __init__(self, path: str | Path, read_only: bool = False, consolidated: bool = True) -> None:
        """`path`: a folder (or file:// URL), an object-store URL (s3://bucket/prefix, gs://, az://),
        or a published store's URL (https://, hf://: read-only, see `backends.published`).

        `self.path` is a Path for a local store and the URL (str) for an object store. A reader
        uses the root's consolidated metadata when there is some, unless `consolidated=False`
        (`ditf doctor` reads every node's own). A writer joins the store's writers (`writers`):
        from here until `close()` nobody else writes a consolidated copy, and ours is dropped
        right before our first write (a command refused before writing leaves the store as it was).

        Raises
        ------
        DitfError
            When there is no store to read, the folder is not a ditf store, its root metadata
            is damaged, or its schema is newer than this ditf.
        """
        self.path = store_location(path)
        self.read_only = read_only
        self._writing = False
        # every write is announced first: locally to the writer registry, on object stores to the
        # lease check (a writer whose lease was lost stops before its next write)
        on_write = None if read_only else leases.check_held if is_remote(self.path) else self._before_write
        self.backend: Backend | ReadBackend = backend_for(self.path, on_write=on_write)
        self.remote = self.backend.remote
        self.layout = StoreLayout(self.backend)
        problem = self.backend.root_problem(read_only)
        if problem:
            raise DitfError(problem)
        if not self.backend.exists("zarr.json"):
            if any(name != META for name in self.backend.list("")):
                raise DitfError(f"{self.path} is not a ditf store (a non-empty folder without zarr.json): "
                                "refusing to write into it; pass a new path or an existing store")
            if read_only:
                raise DitfError(f"store {self.path} is not a zarr store (no zarr.json)")
            self.backend.create_root(root_metadata())
        if not read_only:
            if self.remote:
                self.backend.sweep_dead_staging()
                self.drop_consolidated()  # no shared locks on object stores: drop at once
            else:
                writers.join(self.path, self.drop_consolidated)
                self._writing = True
        try:
            # readers use the consolidated metadata when there is some (one read on a network file
            # system); a writer never does: it must see what other writers did since
            self.root = zarr.open_group(store=self.backend.zarr_store("", read_only), mode="r" if read_only else "r+",
                                        use_consolidated=None if read_only and consolidated else False)
            version = self.root.attrs.get("ditf_schema_version")
        except Exception as exc:  # zarr raises several types for damaged metadata
            raise DitfError(f"cannot open store {self.path}: its zarr.json is damaged ({reason(exc)}): "
                            "run `ditf doctor --repair`") from exc
        if version is not None and version > SCHEMA_VERSION:
            raise DitfError(
                f"store {self.path} uses schema version {version}; this ditf reads up to {SCHEMA_VERSION}: upgrade ditf"
            )
        self.schema_version = version or 1
        if not read_only and self.schema_version < SCHEMA_VERSION:
            self.migrate()

    def sweep_if_alone(self) -> bool:
        """Remove what dead writers left (staging, temp files) where their death is proved.

        Locally that is when no other process writes the store (`writers.sweep_if_alone`); on an
        object store, staging folders whose writer is a dead process of this host or that are
        older than two lease periods (`ObjectBackend.sweep_dead_staging`). False when nothing
        could be proved.
        """
        if self.remote:
            self.backend.sweep_dead_staging()
            return not self.layout.staging()
        return writers.sweep_if_alone(self.path)

    def _before_write(self, what: str) -> None:
        """Every write of this (local) writer is announced here first (see `writers.note_write`)."""
        writers.note_write(self.path)

    def drop_consolidated(self) -> None:
        """Rewrite the root's zarr.json without its consolidated metadata, if it has any."""
        try:
            meta = json.loads(self.backend.read_text("zarr.json"))
        except (OSError, ValueError):
            return  # unreadable: opening reports it (and `ditf doctor --repair` rewrites it)
        if isinstance(meta, dict) and meta.get("consolidated_metadata") is not None:
            meta.pop("consolidated_metadata")
            try:
                self.backend.write_text("zarr.json", json.dumps(meta, indent=2))
            except OSError as exc:
                raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc

    @writes
    def close(self, restore: bool = True) -> bool:
        """End this writer: the last writer of a local store writes consolidated metadata.

        Every node's metadata is then in the root's zarr.json, so a reader opens the store with
        one read. The CLI closes what is left as a command ends; a killed process just leaves
        no copy. Object stores have no shared locks and are not consolidated. Returns True when
        it was written. A writer that wrote nothing writes back a copy that a killed writer
        dropped, unless `restore` is False (a failed command leaves the store as it was).
        """
        if not self._writing:
            return False
        self._writing = False
        return writers.leave(self.path, restore)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.close(restore=exc_type is None)

    @writes
    def migrate(self) -> list[str]:
        """Bring an older store to the current schema in place (see `legacy.migrate`)."""
        return legacy.migrate(self)

    # ---- nodes ------------------------------------------------------------------------------
    def group(self, path: str) -> zarr.Group | None:
        """The group at `path`, None if absent; damaged metadata is one clear error."""
        try:
            node = self.root[path]
        except KeyError:
            return None
        except Exception as exc:
            raise DitfError(f"store {self.path}: the metadata of {path} is damaged ({reason(exc)}): "
                            "run `ditf doctor --repair`") from exc
        if not isinstance(node, zarr.Group):
            raise DitfError(f"store {self.path}: {path} is an array where a group belongs")
        return node

    def has(self, path: str) -> bool:
        """Whether a node (group or array) is at `path`."""
        try:
            self.root[path]
            return True
        except KeyError:
            return False

    def subgroups(self, path: str) -> list[tuple[str, zarr.Group]]:
        """The child groups of `path` ("" for the root), sorted by name."""
        group = self.root if not path else self.group(path)
        if group is None:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `.ditf` is not a zarr node, by design
            try:
                return sorted(group.groups())
            except Exception as exc:
                raise DitfError(f"store {self.path}: the metadata of a node under {path or '/'} is damaged "
                                f"({reason(exc)}): run `ditf doctor --repair`") from exc

    @contextlib.contextmanager
    def staged(self, attributes: Mapping | None = None) -> Iterator[tuple[str, zarr.Group]]:
        """A new group under `.ditf/staging/`, to be built completely and then `publish`ed."""
        staged = self.backend.new_staging()
        try:
            yield staged, zarr.create_group(store=self.backend.zarr_store(staged),
                                            attributes=jsonable(dict(attributes or {})))
        finally:
            self.backend.discard(staged)  # local: published (gone already) or failed; object store: the copy's source

    def publish(self, staged: str, node: str) -> bool:
        """Move a staged group to `node` whole (parents created first, each one atomic write).

        False when `node` exists already (another writer published it first).
        """
        self._require_parents(node)
        return self.backend.publish(staged, node)

    def _require_parents(self, node: str) -> None:
        """Create the groups above `node`, top down: a kill leaves no group without its parent.

        (zarr's `require_group("a/b/c")` writes c before a and b, and a later call that finds
        c stops there, leaving a and b missing and c unreachable.)
        """
        parts = node.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if self.group(prefix) is None:
                try:
                    self.root.require_group(prefix)
                except zarr.errors.ContainsGroupError:
                    pass  # another writer (a concurrent --shard) created it in between: it exists, as wanted

    def delete(self, path: str) -> None:
        """Remove a node whole (it vanishes for every reader first: a kill leaves it or nothing)."""
        try:
            self.backend.remove(path)
        except OSError as exc:
            raise DitfError(f"cannot write to store {self.path}: {exc.strerror or exc}") from exc

    def lock(self, node: str, refusal: str, wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Exclusive right to write one node; `refusal` is the error if it stays taken `wait` seconds.

        Locally a lock file under `.ditf/locks/` (`locks`): the OS drops it when the process
        dies, so a crashed run never leaves a stale lock. On object storage a lease object there
        (`leases`): it expires unless its holder's heartbeat renews it.
        """
        return self.backend.lock(lock_path(node), refusal, wait)

    # ---- image index --------------------------------------------------------------------------
    @writes
    def register_images(self, dataset: str, keys: Sequence[str], sizes: Sequence[tuple[int, int]],
                        digests: Sequence[str] | None = None) -> dict[str, int]:
        """Add images to the dataset's index (existing rows keep their position); key -> row.

        `digests` (one per key, `pixel_digest` of the decoded pixels) are recorded with each new
        row; an indexed key given with another size or digest is refused (`check_identities`),
        so a name reused for other pixels is never served the old row's features. New rows are
        written past the committed `count`, then `count` is raised: a kill in between leaves
        rows that the next call simply overwrites. On S3 the registration is also a
        compare-and-swap (`image_index.register_conditionally`).
        """
        node = f"{dataset}/{IMAGES}"
        # waited for, so concurrent shards queue here instead of failing
        with self.lock(node, f"another process is registering {dataset} images in {self.path}: retry",
                       wait=_INDEX_LOCK_WAIT):
            if self.group(node) is None:
                with self.staged({"count": 0}) as (staged, group):
                    create_index_arrays(group)
                    self.publish(staged, node)
            conditional = self._object_backend().conditional_store(node) if self.remote else None
            if conditional is not None:
                first = [conditional]  # each retry lists the index's versions again
                return image_index.register_conditionally(
                    str(self.path), dataset, keys, sizes, digests,
                    lambda: first.pop() if first else self._object_backend().conditional_store(node))
            group = self.group(node)
            self.check_identities(dataset, keys, sizes, digests)
            rows = self.image_rows(dataset)
            new = image_index.new_rows(rows, keys, sizes, digests)
            if new:
                start = len(rows)
                image_index.append_rows(group, start, new)
                group.attrs["count"] = start + len(new)  # the commit mark of these rows
                rows.update({key: start + i for i, (key, _, _) in enumerate(new)})
            return rows

    @reads("the image index")
    def registration_mark(self, dataset: str) -> dict | None:
        """The claim of an image registration that has not committed (S3's compare-and-swap,
        `image_index.register_conditionally`), or None. One that stays is the mark of a killed writer:
        harmless (readers go by `count`), cleared by the next registration, even of no new image."""
        group = self.group(f"{dataset}/{IMAGES}")
        mark = None if group is None else group.attrs.get(image_index.CLAIM)
        if mark is None:
            return None
        return mark if isinstance(mark, dict) else {"id": str(mark)}

    @reads("the image index")
    def image_rows(self, dataset: str) -> dict[str, int]:
        """image key -> row of every committed row of the dataset's index."""
        group = self.group(f"{dataset}/{IMAGES}")
        return {} if group is None else image_index.committed_rows(group)

    @reads("the image index")
    def image_identities(self, dataset: str) -> dict[str, tuple[tuple[int, int], str]]:
        """image key -> ((width, height), pixel digest) of every committed row; the digest is ""
        where none was recorded (rows written before the index had the column)."""
        group = self.group(f"{dataset}/{IMAGES}")
        return {} if group is None else image_index.identities(group)

    @reads("the image index")
    def check_identities(self, dataset: str, keys: Sequence[str], sizes: Sequence[tuple[int, int]],
                         digests: Sequence[str] | None = None) -> None:
        """Refuse an indexed image key given now with other pixels (another size, or another digest
        where both are known): its stored rows were computed from another image.

        Raises
        ------
        DitfError
            Naming the first such key, its stored and its current size.
        """
        group = self.group(f"{dataset}/{IMAGES}")
        if group is not None:
            image_index.check_identities(group, self.path, dataset, keys, sizes, digests)

    def image_key(self, dataset: str, row: int) -> str:
        """The key of one row (for error messages: a damaged image is named, not numbered)."""
        try:
            return str(self.root[f"{dataset}/{IMAGES}/key"][row])
        except Exception:
            return f"row {row}"

    # ---- features -----------------------------------------------------------------------------
    @writes
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
        adaln_names: Sequence[str] = ("shift", "scale", "gate"),
    ) -> FeatureArrays:
        """Open (or, with `config`, create/validate) the arrays of one (dataset, model, k, t).

        Writing into an existing key with a different `config` is refused, naming the settings
        that differ: silently mixing two configurations in one key would corrupt every score.
        With `adaln=False` (models without AdaLN: DINOv2, the SD UNet) no shift/scale/gate arrays
        are created, only `modulation_names` (normally none). `adaln_names` are the block's own
        vectors: scale-only RMSNorm families store scale, gate and norm_weight (no shift). A new key (arrays and attributes)
        is built in staging and published: it appears whole or not at all.

        Raises
        ------
        DitfError
            When the key is absent (reading), was written with another configuration, or the
            store is read-only.
        """
        path = feature_path(dataset, model, k, t)
        group = self.group(path)
        if config is None:
            if group is None or "complete" not in group:
                raise DitfError(f"store {self.path} has no features for {path}: run `ditf extract` first")
            return self._feature_arrays(group, path, dataset)
        config = jsonable(config)
        if group is not None and PREDICTIONS_OF in group.attrs:
            raise DitfError(f"store {self.path} key {path} holds predictions of the features in "
                            f"{group.attrs[PREDICTIONS_OF]}: extract into another --store")
        if group is not None and "config" in group.attrs:
            refuse_other_config(self.path, path, group.attrs["config"], config)
        if self.read_only:
            raise DitfError(f"store {self.path} is read-only")
        if group is not None and ("complete" not in group or "config" not in group.attrs):
            legacy.clear_half_setup(self, group, path)
            group = None
        if group is None:
            names = ([*adaln_names] if adaln else []) + [*modulation_names]
            attrs = {"config": config, "provenance": jsonable(provenance or {}), "modulation": names}
            with self.staged(attrs) as (staged, new):
                create_feature_arrays(new, n_images=n_images, grid_max=grid_max, hidden_size=hidden_size,
                                      modulation_names=names)
                self.publish(staged, path)
            group = self.group(path)
        arrays = self._feature_arrays(group, path, dataset)
        if n_images is not None and n_images > arrays.n_images:
            arrays.grow(n_images)
        return arrays

    @reads("a feature key's metadata")
    def _feature_arrays(self, group: zarr.Group, path: str, dataset: str) -> FeatureArrays:
        arrays = FeatureArrays(group, path, image_key=functools.partial(self.image_key, dataset))
        arrays.check_schema()
        return arrays

    def feature_arrays(self, key: FeatureKey) -> FeatureArrays:
        """The arrays of a key whose group the audit found (checked against the schema)."""
        group = self.group(key.path)
        if group is None:
            raise DitfError(f"store {self.path} has no features for {key.path}")
        return self._feature_arrays(group, key.path, key.dataset)

    def writer_lock(self, dataset: str, model: str, k: int, t: int, shard: str | None = None,
                    wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """One extract per key at a time: a second writer is refused, not interleaved.

        With `shard` ("i/N", `--shard`) the lock is that shard's alone: shards write disjoint
        images, so any number of them may run at once, but never the same shard twice, never
        beside a whole-key run, and never beside shards of another count N (`run_lock`).
        """
        key = feature_path(dataset, model, k, t)
        return self.run_lock(key, f"extracting {key} into", shard, wait,
                             "(then rerun: completed images are skipped) or use another --store")

    def setup_lock(self, dataset: str, model: str, k: int, t: int,
                   wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """The right to set a key up (shards take turns for it, then write side by side)."""
        key = feature_path(dataset, model, k, t)
        return self.lock(key, f"another process is extracting {key} into {self.path}: wait for it to finish", wait)

    def predictions_lock(self, feature_key: tuple[str, str, int, int], name: str, scope: str,
                         shard: str | None = None) -> contextlib.AbstractContextManager[None]:
        """One `ditf match` per predictions group at a time (`--overwrite` included); shards as
        for `writer_lock`. Held from before the group is opened (or recreated) to the last block."""
        node = f"{feature_path(*feature_key)}/{PREDICTIONS}/{scope}/{name}"
        return self.run_lock(node, f"matching {name} of {feature_path(*feature_key)} in", shard, 0.0,
                             "or use another --variant / --store")

    @contextlib.contextmanager
    def run_lock(self, node: str, doing: str, shard: str | None = None, wait: float = 0.0,
                 advice: str = "") -> Iterator[None]:
        """Exclusion of the runs writing `node`: a whole run excludes every other run; a shard
        ("i/N") excludes the same shard, whole runs and shards of another N (whose blocks overlap).

        Locally: the whole run holds `<node>` and `<node>%whole` exclusively; shard i of N holds
        `<node>%shards-of-N` shared and `<node>%shard-i-of-N` exclusively. `doing` names the run
        and ends in the preposition before the store ("extracting <key> into"). Each takes its own
        locks first and then checks the others' (`locks.is_free`), so of two runs that start at
        once at least one is refused. On object stores (no shared locks) the same with leases: the
        whole run holds the leases `<node>` and `<node>%whole`, shard i of N the lease
        `<node>%shard-i-of-N`; each then checks for the others' live leases
        (`ObjectBackend.live_leases`; an expired one is its dead holder's and does not count).
        """
        refusal = f"another process is {doing} {self.path}: wait for it to finish {advice}".rstrip()
        if shard is None:
            with self.lock(node, refusal, wait), self.lock(f"{node}%whole", refusal):
                running = (self._object_backend().live_leases(f"{node}%shard-") if self.remote else
                           [f.name for f in self._shard_lock_files(node) if not locks.is_free(f)])
                if running:
                    raise DitfError(f"shard jobs are {doing} {self.path} ({', '.join(running)}): "
                                    "wait for them to finish, then rerun")
                yield
            return
        index, count = shard.split("/")
        own = self.lock(f"{node}%shard-{index}-of-{count}",
                        f"another process is {doing} {self.path} (shard {shard}): wait for it to finish")
        if self.remote:
            with own:
                backend = self._object_backend()
                if backend.live_leases(f"{node}%whole"):
                    raise DitfError(f"{refusal} (a run without --shard)")
                others = [name for name in backend.live_leases(f"{node}%shard-")
                          if not name.removesuffix(".lease").endswith(f"-of-{count}")]
                if others:
                    raise DitfError(f"shards of another count are {doing} {self.path} ({', '.join(others)}): "
                                    f"every shard of one run must use the same N (--shard i/{count})")
                yield
            return
        group = self.path / lock_path(f"{node}%shards-of-{count}")
        with locks.shared_lock_file(group, refusal), own:
            if not locks.is_free(self.path / lock_path(f"{node}%whole")):
                raise DitfError(f"{refusal} (a run without --shard)")
            others = [f.name for f in self._shard_lock_files(node) if f != group and not locks.is_free(f)]
            if others:
                raise DitfError(f"shards of another count are {doing} {self.path} ({', '.join(others)}): "
                                f"every shard of one run must use the same N (--shard i/{count})")
            yield

    def _object_backend(self) -> ObjectBackend:
        """This store's backend, known to be an object store (`self.remote`)."""
        from .backends.object import ObjectBackend  # imported when used, as `backend_for` does

        assert isinstance(self.backend, ObjectBackend)
        return self.backend

    def _shard_lock_files(self, node: str) -> list[Path]:
        """The `%shards-of-N` lock files of `node` (one per shard count ever used)."""
        stem = lock_path(f"{node}%shards-of-").removesuffix(".lock")
        folder = (self.path / stem).parent
        return sorted(folder.glob(Path(stem).name.replace("[", "[[]") + "*.lock"))

    def feature_keys(self, dataset: str | None = None) -> list[tuple[str, str, int, int]]:
        """Every (dataset, model, k, t) holding features."""
        return [(key.dataset, key.model, key.k, key.t) for key in self.layout.feature_keys(dataset)]

    def find_feature_key(self, dataset: str, model: str, k: int | None = None, t: int | None = None) -> tuple[int, int]:
        """(k, t) to use when the user gave none: the only one stored for (dataset, model).

        Raises
        ------
        DitfError
            When none or several keys match.
        """
        keys = [(key.k, key.t) for key in self.layout.feature_keys(dataset) if key.model == model]
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
    def prompt_cache(self, model: str, identity: Mapping) -> PromptCache:
        """The encoded prompts of `model` whose text encoders are `identity`."""
        return PromptCache(self, prompt_cache_path(model, identity), jsonable(identity))

    # ---- predictions --------------------------------------------------------------------------
    def _prediction_path(self, feature_key: tuple[str, str, int, int], name: str, scope: str | None) -> str | None:
        """Where predictions `name` live: under `scope`, else the only scope holding them (or schema 1's place)."""
        key = FeatureKey(*feature_key)
        base = f"{key.path}/{PREDICTIONS}"
        unscoped = legacy.unscoped_predictions(base, name)
        if scope is not None:
            for path in (f"{base}/{scope}/{name}", unscoped):
                if self.group(path) is not None:
                    return path
        split = scope.rsplit("-", 1)[0] + "-" if scope else ""  # e.g. a reader of one category's pairs
        found = []
        for path in self.layout.prediction_folders(key):
            first, _, rest = path[len(base) + 1:].partition("/")
            if rest == name and first.startswith(split):
                group = self.group(path)
                if group is not None and "done" in group:
                    found.append(path)
        if not scope and self.group(unscoped) is not None:
            found.append(unscoped)
        if len(found) > 1:
            raise DitfError(f"store {self.path} holds predictions {name} of several splits or pair lists "
                            f"({', '.join(p.split('/')[-3] for p in found)}): pass --split, or run `ditf match` on this pair list")
        return found[0] if found else None

    @writes
    def open_predictions(
        self,
        feature_key: tuple[str, str, int, int],
        name: str,
        pair_ids: Sequence[str] | None = None,
        max_kps: int | None = None,
        attrs: Mapping | None = None,
        block: int = 256,
        value_shape: tuple[int, ...] | None = None,
        scope: str | None = None,
        overwrite: bool = False,
    ) -> PredictionArrays:
        """Predictions of one variant/protocol of one pair list, next to the features they came from.

        One row per pair id: (max_kps, 2) keypoints by default, or `value_shape` (e.g. a 3x3
        homography for HPatches). `scope` (see `prediction_scope`) keeps the pair lists of
        several splits apart; writers get it from the pair ids when not given. A new group is
        built in staging and published whole.

        Raises
        ------
        DitfError
            When reading predictions that are absent, or writing over predictions of other
            settings without `overwrite`.
        """
        value_shape = tuple(value_shape) if value_shape is not None else (max_kps, 2)
        if pair_ids is None:
            path = self._prediction_path(feature_key, name, scope)
            group = self.group(path) if path else None
            if group is None or "done" not in group:
                where = f"{feature_path(*feature_key)}/{PREDICTIONS}/{scope + '/' if scope else ''}{name}"
                raise DitfError(f"store {self.path} has no predictions {where}: run `ditf match` first")
            return PredictionArrays(group, path)
        pair_ids = [str(p) for p in pair_ids]
        scope = scope or prediction_scope(None, pair_ids)
        path = f"{feature_path(*feature_key)}/{PREDICTIONS}/{scope}/{name}"
        attrs = jsonable(attrs or {})
        group = self.group(path)
        if group is not None and overwrite:
            self.delete(path)
            group = None
        if group is not None:
            stored = PredictionArrays(group, path)
            differences = config_differences(stored.config, attrs)
            if differences or stored.pair_ids != pair_ids or group["pred"].shape[1:] != value_shape:
                why = "; ".join(differences) if differences else "the pair list changed"
                raise DitfError(
                    f"predictions {path} exist with other settings ({why}): pass --overwrite to recompute them"
                )
            return stored
        with self.staged({"config": attrs}) as (staged, new):
            create_prediction_arrays(new, pair_ids=pair_ids, value_shape=value_shape, block=block)
            self.publish(staged, path)
        return PredictionArrays(self.group(path), path)

    @writes
    def hold_predictions_of(self, feature_key: tuple[str, str, int, int], source: str) -> None:
        """Make this store's group of a key one that holds only predictions of `source`'s features.

        Marked (attribute `predictions_of`) so the doctor and extract know it is no half-done
        feature key; published whole, like every setup.
        """
        path = feature_path(*feature_key)
        group = self.group(path)
        if group is not None:
            if PREDICTIONS_OF not in group.attrs and "complete" not in group:
                raise DitfError(f"store {self.path} has a half-done feature key {path}: run `ditf doctor --repair`")
            return
        with self.staged({PREDICTIONS_OF: source}) as (staged, _):
            self.publish(staged, path)

    def results_dir(self, feature_key: tuple[str, str, int, int], name: str) -> Path:
        """Folder for results that are files, not arrays (DAVIS masks): beside the store.

        An object store has no "beside": such results go to a local folder named after the URL
        (see `local_beside`), so masks stay files other tools can read.
        """
        return local_beside(self.path, ".results") / feature_path(*feature_key) / name

    def prediction_groups(self, dataset: str, model: str, k: int, t: int) -> list[tuple[str, PredictionArrays]]:
        """Every stored predictions group of a feature key, as ("[scope/]variant/protocol", arrays)."""
        key = FeatureKey(dataset, model, k, t)
        base = f"{key.path}/{PREDICTIONS}/"
        found = []
        for path in self.layout.prediction_folders(key):
            group = self.group(path)
            if group is not None and "done" in group:
                found.append((path[len(base):], PredictionArrays(group, path)))
        return found
