"""The match stage for pair benchmarks: cached features -> variant -> matcher -> predictions.

Reads only the store (the DiT never runs here), computes each image's feature variant once
(an LRU keeps the working set), matches every pair not predicted yet, and commits predictions
to the store in blocks next to the features, so a rerun is incremental and a crash loses at
most one block.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .datasets.base import Dataset, Pair
from .errors import DitfError
from .features import (
    USES_CHANNELS,
    check_variant_applies,
    compute_feature,
    detect_massive_channels,
    variant_names,
)
from .match import make_matcher
from .naming import fusion_label, prediction_name
from .store import FeatureArrays, FeatureStore, prediction_scope

#: pairs committed together (one zarr chunk of predictions); DITF_MATCH_BLOCK makes blocks
#: small so that crash tests see several of them
BLOCK = int(os.environ.get("DITF_MATCH_BLOCK") or 256)


@dataclass
class MatchSettings:
    variant: str = "adaln+cd"
    protocol: str = "dift"
    channels: str = "auto"  # "auto" or comma-separated channel indices
    soft_window: int | None = None  # geoaware only
    channel_sample: int = 32  # images used to detect massive channels for "auto"
    fuse: str | None = None  # partner model (e.g. "dinov2-b14"), concatenated per pair (`fusion`)
    pca_dim: int = 1280  # PCA of the DiT part over each pair before fusing (0: none)

    @property
    def label(self) -> str:
        """The variant as results name it: with `fuse`, ``<variant>+<model>-pca<dim>``."""
        return fusion_label(self.variant, self.fuse, self.pca_dim)

    @property
    def name(self) -> str:
        """Store key of these predictions: variant/protocol (soft-argmax window appended)."""
        return prediction_name(self.variant, self.protocol, self.soft_window, self.fuse, self.pca_dim)


@dataclass
class MatchReport:
    key: str
    n_pairs: int
    matched: int
    skipped: int
    channels: list[int]
    seconds: float


def resolve_channels(spec: str, arrays: FeatureArrays, sample: int = 32) -> list[int]:
    """`--channels`: explicit indices, or "auto": the 100x-median criterion on cached z."""
    spec = spec.strip()
    if spec == "auto":
        if arrays.massive_channels is not None:
            return arrays.massive_channels
        rows = np.flatnonzero(arrays.complete())[:sample]
        if len(rows) == 0:
            return []
        tokens = np.concatenate([arrays.read_image(int(r))[0].reshape(-1, arrays.hidden_size) for r in rows])
        return detect_massive_channels(tokens)
    if spec in ("", "none"):
        return []
    try:
        return sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise DitfError(f"--channels must be 'auto', 'none' or comma-separated integers, got {spec!r}") from None


class FeatureCache:
    """Variant features of recently used images (each computed once per run)."""

    def __init__(self, arrays: FeatureArrays, rows: dict[str, int], variant: str, channels: Sequence[int], size: int = 64):
        self.arrays, self.rows, self.variant, self.channels = arrays, rows, variant, list(channels)
        self.size = size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def pair(self, src_key: str, trg_key: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The pair-level hook of the driver: (source map, target map, target cache key)."""
        return self(src_key), self(trg_key), trg_key

    def __call__(self, key: str) -> torch.Tensor:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pre_adaln, modulation = self.arrays.read_image(self.rows[key])
        feature = compute_feature(self.variant, pre_adaln, modulation, self.channels)
        self._cache[key] = feature
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return feature


def check_features(pairs: Sequence[Pair], rows: dict[str, int], arrays: FeatureArrays) -> None:
    complete = arrays.complete()
    missing = sorted({key for p in pairs for key in (p.src_key, p.trg_key) if key not in rows or not complete[rows[key]]})
    if missing:
        raise DitfError(
            f"{len(missing)} image(s) of the pairs have no features in {arrays.path} (e.g. {missing[0]}): "
            "run `ditf extract` with the same dataset and split first"
        )


def predict(
    store: FeatureStore,
    dataset: Dataset,
    model: str,
    k: int,
    t: int,
    settings: MatchSettings,
    overwrite: bool = False,
    progress: bool = True,
    block_runner=None,
) -> MatchReport:
    """Predict every pair of `dataset` from the cached features of (model, k, t).

    `block_runner(todo_blocks, pairs, rows, channels) -> n_matched`, when given, predicts the
    blocks elsewhere once the prediction arrays exist (`ditf_pipeline.distributed`: dask workers).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if settings.variant not in variant_names():
        raise DitfError(f"unknown variant {settings.variant!r}; known variants: {', '.join(variant_names())}")
    make_matcher(settings.protocol)  # validates the protocol name before any work
    if dataset.task != "pairs":
        raise DitfError(f"dataset {dataset.name} is a {dataset.task} benchmark, not keypoint pairs")
    arrays = store.open_features(dataset.name, model, k, t)
    rows = store.image_rows(dataset.name)
    pairs = dataset.pairs()
    if not pairs:
        raise DitfError(f"dataset {dataset.name} at {dataset.root} has no pairs")
    check_features(pairs, rows, arrays)
    check_variant_applies(settings.variant, bool(arrays.modulation_names))
    channels = resolve_channels(settings.channels, arrays, settings.channel_sample) if settings.variant in USES_CHANNELS else []
    attrs = {
        "variant": settings.variant,
        "protocol": settings.protocol,
        "soft_window": settings.soft_window,
        "channels": channels,
        "features": arrays.config,
    }
    fusion = None
    if settings.fuse:
        from .fusion import PairFusion

        if block_runner is not None:
            raise DitfError("--fuse is not supported by the distributed match runner yet")
        fusion = PairFusion.open(store, dataset, rows, pairs, settings.fuse, settings.pca_dim)
        attrs.update(variant=settings.label, fuse=fusion.describe())
    feature_key = (dataset.name, model, k, t)
    max_kps = max(len(p.src_kps) for p in pairs)
    pair_ids = [p.pair_id for p in pairs]
    predictions = store.open_predictions(feature_key, settings.name, pair_ids, max_kps, attrs, block=BLOCK,
                                         scope=prediction_scope(dataset.split, pair_ids), overwrite=overwrite)
    done = predictions.done()
    matcher = make_matcher(settings.protocol, **({"soft_window": settings.soft_window} if settings.protocol == "geoaware" else {}))
    features = FeatureCache(arrays, rows, settings.variant, channels)
    pair_features = features.pair if fusion is None else fusion.bind(features)
    todo_blocks = [s for s in range(0, len(pairs), BLOCK) if not done[s : s + BLOCK].all()]
    matched = 0
    if block_runner is not None:
        matched = block_runner(todo_blocks, pairs, rows, channels)
        todo_blocks = []
    with tqdm(total=sum(len(pairs[s : s + BLOCK]) for s in todo_blocks), desc=f"match {settings.name}", unit="pair",
              disable=not progress) as bar:
        for block_start in todo_blocks:
            block = pairs[block_start : block_start + BLOCK]
            out = []
            for pair in block:
                try:
                    src, trg, trg_key = pair_features(pair.src_key, pair.trg_key)
                    out.append(matcher.match(src, pair.src_size, trg, pair.trg_size, pair.src_kps, trg_key=trg_key))
                except DitfError as exc:
                    raise DitfError(f"pair {pair.pair_id}: {exc}") from exc
                bar.update(1)
            predictions.write(block_start, out)
            matched += len(block)
    return MatchReport(
        key=predictions.path, n_pairs=len(pairs), matched=matched,
        skipped=len(pairs) - matched, channels=channels, seconds=time.perf_counter() - start,
    )
