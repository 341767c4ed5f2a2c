"""What the probe reads: one store's features per image scale, the labels, read ahead on a pool.

The DiT never runs here: features come from the store, one image at a time, as the variant
(``raw``, ``adaln``, ``adaln-t``, ``adaln-c``; no channel discard for this task) computed from
the cached pre-AdaLN stream and AdaLN vectors. One store per image scale: the same dataset
extracted with several ``--img-size`` (same model, k, t; configs differing only in ``img_size``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import DitfError
from ..datasets.base import Dataset
from ..match.features import compute_feature
from ..store.feature_store import FeatureArrays, FeatureStore, config_differences

__all__ = ["PROBE_VARIANTS", "FeatureSource", "check_variant", "num_classes", "open_sources", "read_ahead",
           "resize_label"]

#: variant -> the modulation vectors it needs (channel discard is not used for segmentation)
PROBE_VARIANTS: dict[str, tuple[str, ...]] = {
    "raw": (),
    "adaln": ("shift", "scale"),
    "adaln-t": ("shift_t", "scale_t"),
    "adaln-c": ("shift_c", "scale_c"),
}


@dataclass
class FeatureSource:
    """One store's features of (dataset, model, k, t) at one image scale."""

    store: FeatureStore
    arrays: FeatureArrays
    rows: dict[str, int]

    @property
    def scale(self):
        return self.arrays.config.get("img_size")

    @property
    def hidden_size(self) -> int:
        return self.arrays.hidden_size

    def feature(self, key: str, variant: str) -> torch.Tensor:
        pre_adaln, modulation = self.arrays.read_image(self.rows[key])
        return compute_feature(variant, pre_adaln, modulation)

    def check(self, keys: Sequence[str], split: str, dataset: str) -> None:
        complete = self.arrays.complete()
        missing = [k for k in keys if k not in self.rows or self.rows[k] >= len(complete) or not complete[self.rows[k]]]
        if missing:
            raise DitfError(
                f"store {self.store.path} has no features for {len(missing)} of {len(keys)} {dataset} {split} "
                f"images in {self.arrays.path} (first: {missing[0]}): run `ditf extract --dataset {dataset} "
                f"--split {split} --store {self.store.path}` with the same model, k, t"
            )


def check_variant(arrays: FeatureArrays, variant: str) -> None:
    """`variant` is a probe variant and the key holds the AdaLN vectors it needs."""
    if variant not in PROBE_VARIANTS:
        extra = " (channel discard is not used for segmentation)" if "+cd" in variant else ""
        raise DitfError(f"unknown probe variant {variant!r}{extra}; choose one of {', '.join(PROBE_VARIANTS)}")
    have = set(arrays.modulation_names)
    missing = [name for name in PROBE_VARIANTS[variant] if name not in have]
    if missing:
        raise DitfError(
            f"{arrays.path} holds no {', '.join(missing)} modulation vectors (a model without AdaLN, or "
            f"not extracted): variant {variant!r} needs them; use --variant raw"
        )


def open_sources(
    stores: Sequence[FeatureStore], dataset: str, model: str, k: int, t: int, variant: str
) -> list[FeatureSource]:
    """The same (dataset, model, k, t) in every store, one scale each; configs may differ in img_size only."""
    if not stores:
        raise DitfError("no --store given")
    sources = []
    for store in stores:
        arrays = store.open_features(dataset, model, k, t)
        check_variant(arrays, variant)
        sources.append(FeatureSource(store, arrays, store.image_rows(dataset)))
    first = sources[0]
    for source in sources[1:]:
        a = {key: v for key, v in first.arrays.config.items() if key != "img_size"}
        b = {key: v for key, v in source.arrays.config.items() if key != "img_size"}
        differences = config_differences(a, b)
        if differences:
            raise DitfError(
                f"stores {first.store.path} and {source.store.path} hold {first.arrays.path} with different settings "
                f"besides img_size ({'; '.join(differences)}): scales must differ in img_size only"
            )
        if source.hidden_size != first.hidden_size:
            raise DitfError(f"stores {first.store.path} and {source.store.path} hold features of different widths")
    scales = [s.scale for s in sources]
    if len(set(map(str, scales))) != len(scales):
        raise DitfError(f"two --store hold the same image scale (img_size {scales}): give one store per scale")
    return sources


def read_ahead(items: Iterable, load: Callable, workers: int, lookahead: int) -> Iterator:
    """`load(item)` for each item, in order, computed by a thread pool `lookahead` items ahead."""
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque(pool.submit(load, item) for _, item in zip(range(max(1, lookahead)), iterator))
        while pending:
            future = pending.popleft()
            for item in iterator:
                pending.append(pool.submit(load, item))
                break
            yield future.result()


def resize_label(labels: np.ndarray, max_side: int | None) -> np.ndarray:
    """Labels nearest-resized to a long side of at most `max_side` (as they are without one)."""
    from PIL import Image

    h, w = labels.shape
    if not max_side or max(h, w) <= max_side:
        return labels
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(labels, "L").resize(size, Image.Resampling.NEAREST))


def num_classes(dataset: Dataset) -> tuple[int, int, list[str]]:
    """(classes, ignore index, class names) of a segmentation benchmark; any other dataset is refused."""
    count = getattr(dataset, "num_classes", None)
    if dataset.task != "segmentation" or not hasattr(dataset, "load_label") or not count:
        raise DitfError(f"dataset {dataset.name!r} is not a semantic segmentation benchmark (task {dataset.task!r})")
    names = list(getattr(dataset, "class_names", [str(i) for i in range(count)]))
    return int(count), int(getattr(dataset, "ignore_index", 255)), names
