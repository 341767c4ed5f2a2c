"""The state behind `ditf view`: the read-only store, the dataset reader and what is cached.

One `Explorer` serves every request of a running app. It opens the main store read-only, reads
pairs and image paths from the dataset root, and caches what a click needs: the variant maps of
the open pair (`queries.VariantMaps`; a pair is opened once, then each click is a few small
matrix products), per-pair PCK of stored predictions, and the PNG figures of a key. Every
request first checks whether the store changed since the last one (`refresh`): a writer
rewrites the root's metadata when it starts and when it ends, so a store extracted into,
matched into or rebuilt underneath a running view is reopened and every cache dropped, and a
row is never looked up in an index of another store's images. Every
user-facing problem is a `DitfError` (`ViewNotFound` for an unknown key, pair or image), which
the web layer turns into an HTTP 4xx with the message.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets.base import Pair
from ..core.errors import DitfError
from ..store.backends.locations import is_remote, store_location
from ..store.feature_store import FeatureStore, prediction_scope
from . import queries
from .uploads import UPLOAD_DATASET, Uploads

#: the pseudo dataset under which uploaded pairs are listed
UPLOADS = "uploads"
#: variant maps kept in memory (3 variants x 2 pairs; 40 MB each at SPair size)
MAPS_CACHE = 6
#: seconds between two checks of an object store for changes (each check lists the store's keys)
REMOTE_RECHECK_S = 5.0


class ViewNotFound(DitfError):
    """An unknown key, pair or image (HTTP 404 rather than 400)."""


@dataclass(frozen=True)
class KeyRef:
    """One feature key of the store: (dataset, model, k, t); dataset ``uploads`` = the uploads store."""

    dataset: str
    model: str
    k: int
    t: int

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.model}/k{self.k}/t{self.t}"


@dataclass
class _DatasetIndex:
    reader: object
    pairs: list[Pair]
    by_id: dict[str, Pair]
    paths: dict[str, Path]


class Explorer:
    """Everything the web app asks, answered from the cache (no DiT runs, except for uploads)."""

    def __init__(self, store: Path | str, data_root: Path | str | None = None, split: str | None = None,
                 uploads: Path | str | Uploads | None = None) -> None:
        self.location = store_location(store)
        if not is_remote(self.location) and not Path(self.location).exists():
            raise DitfError(f"store {store} does not exist: run `ditf extract` first")
        self.store = FeatureStore(self.location, read_only=True)
        self._seen: object = None
        self._checked_at = 0.0
        self.data_root = Path(data_root).resolve() if data_root is not None else None
        if self.data_root is not None and not self.data_root.is_dir():
            raise DitfError(f"dataset root {data_root} does not exist or is not a directory")
        self.split = split
        self.uploads = uploads if isinstance(uploads, Uploads) or uploads is None else Uploads(uploads)
        self._upload_pairs: dict[str, Pair] = {}
        self._lock = threading.RLock()
        self._datasets: dict[str, _DatasetIndex] = {}
        self._maps: OrderedDict[tuple, queries.VariantMaps] = OrderedDict()
        self._channels: dict[KeyRef, list[int]] = {}
        self._pcks: dict[tuple, dict] = {}
        self._pngs: dict[tuple, bytes] = {}
        self._meta: dict[tuple, object] = {}
        self._seen = self._fingerprint()

    # ---- freshness ----------------------------------------------------------------------------
    def _fingerprint(self) -> object:
        """What changes whenever a writer touched the store (module docstring).

        A local store: the root zarr.json's identity and time (every writer rewrites it when it
        starts and when it ends; a rebuilt store has a new one). An object store keeps no
        consolidated copy, so there it is the keys and image indexes themselves.
        """
        if not self.store.remote:
            try:
                st = os.stat(Path(self.store.path) / "zarr.json")
            except OSError:
                return None
            return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        fresh = FeatureStore(self.location, read_only=True)
        keys = fresh.feature_keys()
        digest = hashlib.sha256(repr(keys).encode())
        for dataset in sorted({k[0] for k in keys}):
            digest.update(repr(sorted(fresh.image_rows(dataset).items())).encode())
        return digest.hexdigest()

    def refresh(self) -> bool:
        """Reopen the store and drop every cache when it changed since the last request; True if so."""
        with self._lock:
            now = time.monotonic()
            if self.store.remote and now - self._checked_at < REMOTE_RECHECK_S:
                return False
            self._checked_at = now
            seen = self._fingerprint()
            if seen == self._seen:
                return False
            if not is_remote(self.location) and not Path(self.location).exists():
                raise DitfError("the store was removed while the view runs: restart `ditf view` when it is back")
            self.store = FeatureStore(self.location, read_only=True)
            self._seen = seen
            self._maps.clear()
            self._channels.clear()
            self._pcks.clear()
            self._pngs.clear()
            self._meta.clear()
            return True

    # ---- keys ---------------------------------------------------------------------------------
    def _uploads_store(self) -> FeatureStore | None:
        if self.uploads is None or not self.uploads.store_path.exists():
            return None
        return FeatureStore(self.uploads.store_path, read_only=True)

    def _store_of(self, key: KeyRef) -> tuple[FeatureStore, str]:
        if key.dataset == UPLOADS:
            store = self._uploads_store()
            if store is None:
                raise ViewNotFound("no uploaded images yet")
            return store, UPLOAD_DATASET
        return self.store, key.dataset

    def key(self, dataset: str, model: str, k: int, t: int) -> KeyRef:
        """The key if the store holds it, else a 404 naming what it holds."""
        wanted = KeyRef(str(dataset), str(model), int(k), int(t))
        store, name = (self._uploads_store(), UPLOAD_DATASET) if wanted.dataset == UPLOADS else (self.store, wanted.dataset)
        held = [] if store is None else [KeyRef(wanted.dataset, m, kk, tt) for _, m, kk, tt in store.feature_keys(name)]
        if wanted not in held:
            have = ", ".join(k.label for k in self.all_keys()) or "nothing"
            raise ViewNotFound(f"the store has no features for {wanted.label} (it has: {have})")
        return wanted

    def all_keys(self) -> list[KeyRef]:
        keys = [KeyRef(*key) for key in self.store.feature_keys()]
        uploads = self._uploads_store()
        if uploads is not None:
            keys += [KeyRef(UPLOADS, m, k, t) for _, m, k, t in uploads.feature_keys(UPLOAD_DATASET)]
        return keys

    def _cached(self, what: str, key: KeyRef, compute):
        """Per-key metadata read once (the main store is read-only; uploads reset their keys' entries)."""
        if (what, key) not in self._meta:
            self._meta[(what, key)] = compute()
        return self._meta[(what, key)]

    def _arrays(self, key: KeyRef):
        store, name = self._store_of(key)
        return self._cached("arrays", key, lambda: store.open_features(name, key.model, key.k, key.t))

    def _rows(self, key: KeyRef) -> dict[str, int]:
        store, name = self._store_of(key)
        return self._cached("rows", key, lambda: store.image_rows(name))

    def _scope(self, key: KeyRef) -> tuple[str | None, str | None]:
        """(scope, split) of the pair list the view shows for a key (`store.prediction_scope`, as
        `ditf match` keys its predictions); scope None when the pairs are not readable here."""
        if key.dataset == UPLOADS:
            return None, None
        if self.data_root is None:
            return None, self.split
        try:
            index = self._dataset(key.dataset)
        except (DitfError, OSError, ValueError, KeyError):  # another dataset's key, or a root that is not this benchmark's
            return None, self.split
        split = getattr(index.reader, "split", self.split)
        return prediction_scope(split, [p.pair_id for p in index.pairs]), split

    def _predictions(self, key: KeyRef) -> dict:
        """"variant/protocol" -> stored predictions of the view's pair list (`queries.choose_predictions`)."""
        store, name = self._store_of(key)

        def compute():
            scope, split = self._scope(key)
            return queries.choose_predictions(store.prediction_groups(name, key.model, key.k, key.t), scope, split)

        return self._cached("predictions", key, compute)

    def _prediction_configs(self, key: KeyRef) -> dict[str, dict]:
        return self._cached("prediction configs", key,
                            lambda: {name: arrays.config for name, arrays in self._predictions(key).items()})

    def _variants_cached(self, key: KeyRef) -> list[str]:
        return self._cached("variants", key, lambda: self.variants(key))

    def variants(self, key: KeyRef) -> list[str]:
        """What a view can show for the key: the ablation variants, then the stored fused ones."""
        arrays = self._arrays(key)
        base = list(queries.BASE_VARIANTS) if "scale" in arrays.modulation_names else ["raw"]
        return base + sorted(queries.fused_specs(self._prediction_configs(key)))

    def describe_keys(self) -> list[dict]:
        with self._lock:
            out = []
            for key in self.all_keys():
                arrays = self._arrays(key)
                out.append({
                    "id": key.label, "dataset": key.dataset, "model": key.model, "k": key.k, "t": key.t,
                    "variants": self.variants(key), "predictions": sorted(self._prediction_configs(key)),
                    "images": int(arrays.complete().sum()), "channels": arrays.hidden_size,
                    "massive_channels": arrays.massive_channels,
                })
            return out

    def default_key(self) -> tuple[str | None, str | None]:
        """(label, note) of the key the page opens on: the rule of every ditf command.

        The first stored key that is its model's default key, else the only key, else the first
        one with a note saying so (`queries.default_key`).
        """
        from ..models import get_spec

        keys = self.all_keys()
        defaults = {}
        for model in {k.model for k in keys}:
            try:
                spec = get_spec(model)
            except DitfError:  # a model this ditf does not know has no default
                continue
            defaults[model] = (spec.default_k, spec.default_t)
        return queries.default_key([k.label for k in keys], [(k.model, k.k, k.t) for k in keys], defaults)

    def offered_models(self) -> list[str]:
        """The models an upload may run (what the page lists): none when uploads are off."""
        if self.uploads is None:
            return []
        return self.uploads.offered_models(k.model for k in self.all_keys())

    def channels(self, key: KeyRef) -> list[int]:
        """Discarded channels of ``adaln+cd``: those `ditf match` stored with its predictions, else auto."""
        if key not in self._channels:
            stored = [c.get("channels") for name, c in self._prediction_configs(key).items()
                      if name.split("/")[0] in ("adaln+cd", "adaln+cd-post") and c.get("channels") is not None]
            if stored:
                self._channels[key] = [int(c) for c in stored[0]]
            else:
                from ..match.inputs import resolve_channels

                self._channels[key] = resolve_channels("auto", self._arrays(key))
        return self._channels[key]

    # ---- pairs --------------------------------------------------------------------------------
    def _dataset(self, name: str) -> _DatasetIndex:
        if name not in self._datasets:
            if self.data_root is None:
                raise DitfError("pairs and images need the dataset: start `ditf view` with --data-root DIR")
            from ..datasets import get_dataset

            reader = get_dataset(name, self.data_root, self.split)
            if reader.task != "pairs":
                raise DitfError(f"dataset {name} is a {reader.task} benchmark, not keypoint pairs")
            pairs = reader.pairs()
            self._datasets[name] = _DatasetIndex(reader, pairs, {p.pair_id: p for p in pairs},
                                                 {r.key: r.path for r in reader.images()})
        return self._datasets[name]

    def _pairs_of(self, key: KeyRef) -> list[Pair]:
        if key.dataset == UPLOADS:
            return [p for p in self._upload_pairs.values() if p.extra.get("key") == key]
        return self._dataset(key.dataset).pairs

    def _pair(self, key: KeyRef, pair_id: str) -> Pair:
        if key.dataset == UPLOADS:
            pair = self._upload_pairs.get(pair_id)
            if pair is None or pair.extra.get("key") != key:
                raise ViewNotFound(f"no uploaded pair {pair_id!r} for {key.label}")
            return pair
        index = self._dataset(key.dataset)
        if pair_id in index.by_id:
            return index.by_id[pair_id]
        from ..analysis.analyze import find_pairs

        try:
            return find_pairs(index.pairs, [str(pair_id)])[0]
        except DitfError as exc:
            raise ViewNotFound(str(exc)) from None

    def _stored_predictions(self, key: KeyRef, name: str) -> dict[str, np.ndarray] | None:
        arrays = self._predictions(key).get(name)
        return None if arrays is None else arrays.read()

    def pairs(self, key: KeyRef, variant: str, protocol: str, alpha: float, category: str | None = None,
              order: str = "id") -> dict:
        """The pair list, with each pair's PCK@alpha of the variant's STORED predictions (sortable)."""
        if order not in ("id", "pck"):
            raise DitfError(f"order must be 'id' or 'pck', got {order!r}")
        _check_protocol(protocol)
        with self._lock:
            pairs = self._pairs_of(key)
            categories = sorted({p.category for p in pairs})
            if category:
                if category not in categories:
                    raise ViewNotFound(f"no pairs of category {category!r} (categories: {', '.join(categories)})")
                pairs = [p for p in pairs if p.category == category]
            name = f"{variant}/{protocol}"
            cache_key = (key, name, float(alpha))
            if cache_key not in self._pcks:
                stored = self._stored_predictions(key, name)
                self._pcks[cache_key] = None if stored is None else queries.pair_pcks(stored, self._pairs_of(key), alpha, protocol)
            pcks = self._pcks[cache_key]
            rows = [{"pair_id": p.pair_id, "category": p.category, "keypoints": len(p.src_kps),
                     "pck": None if pcks is None else pcks.get(p.pair_id)} for p in pairs]
            if order == "pck":
                rows.sort(key=lambda r: (r["pck"] is None, r["pck"] if r["pck"] is not None else 0.0, r["pair_id"]))
            note = None if pcks is not None else (
                f"no stored predictions {name} for {key.label}: run `ditf match --variant {variant} --protocol {protocol}` "
                "to list pairs by PCK")
            return {"pairs": rows, "categories": categories, "pck_from": name if pcks is not None else None,
                    "alpha": alpha, "note": note}

    # ---- an open pair -------------------------------------------------------------------------
    def _maps_for(self, key: KeyRef, pair: Pair, variant: str, protocol: str = "dift") -> queries.VariantMaps:
        """The variant maps of an open pair, computed as `ditf match` computes them: the float16
        maps of `predict.pair_feature_cache` (with the authors' arithmetic for a ``--precision
        paper`` key under ``dift``), fused with the partner's raw maps like `fusion.PairFusion`."""
        from ..match.features import compute_feature
        from ..match.paper import paper_feature, paper_matching
        from ..match.predict import pair_feature_cache

        arrays, rows = self._arrays(key), self._rows(key)
        paper = paper_matching(arrays.config, protocol)
        cache_key = (key, pair.pair_id, variant, paper)
        if cache_key in self._maps:
            self._maps.move_to_end(cache_key)
            return self._maps[cache_key]
        for image in (pair.src_key, pair.trg_key):
            if image not in rows or not arrays.complete()[rows[image]]:
                raise DitfError(f"image {image} has no features in {key.label}: run `ditf extract`")

        def features(name: str, channels: Sequence[int]):  # the view caches the maps itself: no LRU here
            return pair_feature_cache(arrays, rows, name, channels, max_bytes=0,
                                      compute=paper_feature if paper else compute_feature)

        with queries.one_intra_op_thread():  # as `ditf match` computes them (bit for bit, fused PCA included)
            src, trg = self._pair_maps(key, pair, variant, features)
        maps = queries.VariantMaps(variant, src, trg, tuple(pair.src_size), tuple(pair.trg_size), paper=paper)
        self._maps[cache_key] = maps
        while len(self._maps) > MAPS_CACHE:
            self._maps.popitem(last=False)
        return maps

    def _pair_maps(self, key: KeyRef, pair: Pair, variant: str, features) -> tuple:
        from ..match.features import USES_CHANNELS, VARIANTS
        from ..match.predict import FeatureCache

        rows = self._rows(key)
        if variant in VARIANTS:
            channels = self.channels(key) if variant in USES_CHANNELS else []
            feature = features(variant, channels)
            src, trg = feature(pair.src_key), feature(pair.trg_key)
        else:
            spec = queries.fused_specs(self._prediction_configs(key)).get(variant)
            if spec is None:
                raise DitfError(f"unknown variant {variant!r} for {key.label}; available: {', '.join(self.variants(key))}")
            from ..match.fusion import fuse_pair

            store, dataset = self._store_of(key)
            partner = store.open_features(dataset, spec.model, spec.k, spec.t)
            for image in (pair.src_key, pair.trg_key):
                if not partner.complete()[rows[image]]:
                    raise DitfError(f"image {image} has no features in {spec.model}/k{spec.k}/t{spec.t}: run `ditf extract`")
            feature = features(spec.variant, spec.channels)
            other = FeatureCache(partner, rows, "raw", [], max_bytes=0)  # as `predict.open_fusion` reads the partner
            src, trg = fuse_pair(feature(pair.src_key), feature(pair.trg_key), other(pair.src_key), other(pair.trg_key),
                                 spec.pca_dim)
        return src, trg

    def _check_variants(self, key: KeyRef, variants: Sequence[str]) -> list[str]:
        available = self._variants_cached(key)
        if not variants:
            raise DitfError("choose at least one variant")
        unknown = [v for v in variants if v not in available]
        if unknown:
            raise DitfError(f"unknown variant {unknown[0]!r} for {key.label}; available: {', '.join(available)}")
        return list(dict.fromkeys(variants))

    def open_pair(self, key: KeyRef, pair_id: str, variants: Sequence[str], protocol: str, alpha: float) -> dict:
        """Images, keypoints and, per variant, every keypoint's prediction with its correct/wrong mark.

        Predictions come from the store when `ditf match` wrote them (else they are computed
        here with the same matcher; `computed` says which, `agrees` checks the two are equal).
        """
        _check_protocol(protocol)
        with self._lock:
            pair = self._pair(key, pair_id)
            variants = self._check_variants(key, variants)
            result = {
                "pair_id": pair.pair_id, "category": pair.category, "key": key.label,
                "src": {"key": pair.src_key, "size": list(pair.src_size)},
                "trg": {"key": pair.trg_key, "size": list(pair.trg_size)},
                "src_kps": pair.src_kps.tolist(), "trg_kps": pair.trg_kps.tolist(),
                "threshold_base": pair.threshold_base if len(pair.src_kps) else None,
                "bbox": list(pair.trg_bbox) if pair.trg_bbox is not None else None,
                "alpha": alpha, "protocol": protocol, "variants": {},
            }
            for variant in variants:
                maps = self._maps_for(key, pair, variant, protocol)
                entry: dict = {"grid": [int(maps.trg.shape[0]), int(maps.trg.shape[1])]}
                if len(pair.src_kps):
                    computed = maps.match_keypoints(pair.src_kps, protocol)
                    stored = (self._stored_predictions(key, f"{variant}/{protocol}") or {}).get(pair.pair_id)
                    pred = stored if stored is not None and len(stored) == len(computed) else computed
                    entry.update(
                        pred=np.asarray(pred).tolist(), source="stored" if pred is stored else "computed",
                        agrees=None if pred is computed else bool(np.array_equal(np.asarray(stored, np.float64), computed)),
                        correct=queries.keypoint_marks(pred, pair.trg_kps, pair.threshold_base, alpha, protocol),
                    )
                result["variants"][variant] = entry
            return result

    def click(self, key: KeyRef, pair_id: str, variants: Sequence[str], protocol: str,
              x: float | None = None, y: float | None = None, keypoint: int | None = None, alpha: float = 0.1) -> dict:
        """Heatmap and predicted point per variant for a clicked pixel or an annotated keypoint.

        A keypoint's prediction is taken from the batched match of all the pair's keypoints,
        the call `ditf match` makes, so it is the stored prediction bit for bit.
        """
        _check_protocol(protocol)
        start = time.perf_counter()
        with self._lock:
            pair = self._pair(key, pair_id)
            variants = self._check_variants(key, variants)
            if keypoint is not None:
                if not 0 <= keypoint < len(pair.src_kps):
                    raise DitfError(f"keypoint {keypoint} does not exist: pair {pair.pair_id} has {len(pair.src_kps)}")
                px, py = queries.check_point(*pair.src_kps[keypoint], pair.src_size)
            else:
                if x is None or y is None:
                    raise DitfError("give a point (x and y) or a keypoint index")
                px, py = queries.check_point(x, y, pair.src_size)
            out = []
            for variant in variants:
                maps = self._maps_for(key, pair, variant, protocol)
                pred = maps.match_keypoints(pair.src_kps, protocol)[keypoint] if keypoint is not None else None
                out.append(queries.click(maps, px, py, protocol, pred=pred))
            answer = {"point": [px, py], "keypoint": keypoint, "protocol": protocol, "results": out}
            if keypoint is not None:
                answer["gt"] = pair.trg_kps[keypoint].tolist()
                answer["radius"] = float(alpha) * pair.threshold_base
            answer["ms"] = round(1000 * (time.perf_counter() - start), 2)
            return answer

    # ---- images and figures -------------------------------------------------------------------
    def image_path(self, dataset: str, image: str) -> Path:
        """The file of a dataset image by its key; never a path outside the dataset root."""
        if dataset == UPLOADS:
            if self.uploads is None:
                raise ViewNotFound("uploads are off")
            try:
                return self.uploads.image_path(image)
            except DitfError as exc:
                raise ViewNotFound(str(exc)) from None
        with self._lock:
            if dataset not in {k.dataset for k in self.all_keys()}:
                raise ViewNotFound(f"the store has no dataset {dataset!r}")
            path = self._dataset(dataset).paths.get(image)
        if path is None:
            raise ViewNotFound(f"dataset {dataset} has no image {image!r}")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.data_root) or not resolved.is_file():
            raise ViewNotFound(f"image {image!r} is not a file inside the dataset root")
        return resolved

    def magnitude_png(self, key: KeyRef) -> bytes:
        with self._lock:
            cache_key = ("magnitude", key)
            if cache_key not in self._pngs:
                self._pngs[cache_key] = queries.magnitude_png(self._arrays(key), title=f"{key.label}: mean |a| per channel "
                                                              "(massive channels in red)")
            return self._pngs[cache_key]

    def pca_png(self, key: KeyRef, pair_id: str) -> bytes:
        from ..core.images import load_rgb

        with self._lock:
            pair = self._pair(key, pair_id)
            cache_key = ("pca", key, pair.pair_id)
            if cache_key not in self._pngs:
                rows = self._rows(key)
                arrays = self._arrays(key)
                has_adaln = "scale" in arrays.modulation_names
                images = [np.asarray(load_rgb(self.image_path(key.dataset, name))) for name in (pair.src_key, pair.trg_key)]
                self._pngs[cache_key] = queries.pca_png(
                    arrays, [rows[pair.src_key], rows[pair.trg_key]], images, [pair.src_key, pair.trg_key],
                    self.channels(key) if has_adaln else [], title=f"{key.label}: PCA of the features before / after AdaLN")
            return self._pngs[cache_key]

    # ---- uploads ------------------------------------------------------------------------------
    def upload(self, model: str, k: int | None, t: int | None, source: bytes, target: bytes) -> dict:
        """Cache two images of the user's, extract their features (tiny models on CPU), open them as a pair."""
        from ..core.images import image_size

        if self.uploads is None:
            raise DitfError("uploads are off (start `ditf view` with an uploads folder)")
        offered = self.offered_models()
        if model not in offered:  # checked before anything is decoded or loaded
            raise DitfError(f"model {model!r} is not offered for uploads here; choose one of: {', '.join(offered) or 'none'}")
        ids = [self.uploads.add_image(source), self.uploads.add_image(target)]
        _, model_name, kk, tt = self.uploads.extract(model, k, t, ids)
        key = KeyRef(UPLOADS, model_name, kk, tt)
        sizes = [image_size(self.uploads.image_path(i)) for i in ids]
        pair_id = f"{ids[0]}-{ids[1]}"
        pair = Pair(pair_id=pair_id, category="uploads", src_key=ids[0], trg_key=ids[1],
                    src_kps=np.zeros((0, 2)), trg_kps=np.zeros((0, 2)), src_size=sizes[0], trg_size=sizes[1],
                    threshold_base=0.0, extra={"key": key})
        with self._lock:
            self._upload_pairs[pair_id] = pair
            for cache_key in [c for c in self._maps if c[0] == key]:  # re-extracted keys: drop stale maps
                del self._maps[cache_key]
            for cache_key in [c for c in self._meta if c[1].dataset == UPLOADS]:  # new rows in the uploads store
                del self._meta[cache_key]
            self._pngs = {c: v for c, v in self._pngs.items() if c[1].dataset != UPLOADS}
        return {"key": {"dataset": key.dataset, "model": key.model, "k": key.k, "t": key.t, "id": key.label},
                "pair_id": pair_id}


def _check_protocol(protocol: str) -> None:
    if protocol not in queries.PROTOCOLS:
        raise DitfError(f"unknown protocol {protocol!r}; choose {' or '.join(queries.PROTOCOLS)}")
