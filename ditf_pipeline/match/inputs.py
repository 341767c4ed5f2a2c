"""What the pair match stage checks before any work, and the massive channels it discards.

Why apart from `predict`: the checks (`open_inputs`, `check_features`) and the channel rule
(`resolve_channels`) are shared by the match stage, `ditf analyze`, `ditf view` and export; none
of them needs the feature cache, the matchers' drivers or the executors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import DitfError
from ..core.settings import MatchSettings
from ..core.shards import Shard
from ..datasets.base import Dataset, Pair
from ..store.feature_store import FeatureArrays, FeatureStore
from ..validate import unknown
from .device import resolve_match_device
from .features import MASSIVE_RATIO, ChannelMeans, check_variant_applies, variant_names
from .matchers import make_matcher
from .early import planned_jobs


def resolve_channels(spec: str, arrays: FeatureArrays, sample: int = 32) -> list[int]:
    """`--channels`: explicit indices, or "auto": the 100x-median criterion on cached z.

    "auto" reads the channels stored in the key (`ditf analyze` or an earlier match wrote them);
    otherwise it detects them once, on the first `sample` complete images with a running
    per-channel mean (one image in memory at a time), and stores them in the key with how they
    were found, so every later match of the key reuses the same set without re-reading images.
    A read-only store gets the detection without the write.
    """
    spec = spec.strip()
    if spec == "auto":
        if arrays.massive_channels is not None:
            return arrays.massive_channels
        rows = np.flatnonzero(arrays.complete())[:sample]
        if len(rows) == 0:
            return []
        means = ChannelMeans(arrays.hidden_size)
        for row in rows:
            means.add(arrays.read_image(int(row), vectors=())[0])
        channels = means.massive(MASSIVE_RATIO)
        info = {"criterion": f"mean |z| over tokens > {MASSIVE_RATIO:g} x median of the channel means",
                "images": int(len(rows)), "tokens": int(means.tokens), "by": "ditf match --channels auto"}
        try:
            arrays.set_massive_channels(channels, info)
        except (DitfError, OSError, PermissionError, ValueError):
            pass  # a read-only store: detect again next time
        return channels
    if spec in ("", "none"):
        return []
    try:
        channels = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise DitfError(f"--channels must be 'auto', 'none' or comma-separated integers, got {spec!r}") from None
    bad = [c for c in channels if not 0 <= c < arrays.hidden_size]
    if bad:  # checked here, before a rerun with --overwrite deletes anything
        raise DitfError(f"--channels {bad[0]} is out of range: the features have channels 0..{arrays.hidden_size - 1}")
    return channels


def check_features(pairs: Sequence[Pair], rows: dict[str, int], arrays: FeatureArrays) -> None:
    complete = arrays.complete()
    missing = sorted({key for p in pairs for key in (p.src_key, p.trg_key) if key not in rows or not complete[rows[key]]})
    if missing:
        raise DitfError(
            f"{len(missing)} image(s) of the pairs have no features in {arrays.path} (e.g. {missing[0]}): "
            "run `ditf extract` with the same dataset and split first"
        )


@dataclass(frozen=True)
class MatchInputs:
    """What `predict` checked before any work: the feature arrays, image rows and pairs of the
    dataset, the matching device and how many jobs may match."""

    feature_key: tuple[str, str, int, int]
    arrays: FeatureArrays
    rows: dict[str, int]
    pairs: list[Pair]
    device: torch.device
    jobs: int
    shard: Shard


def open_inputs(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, settings: MatchSettings,
                overwrite: bool = False) -> MatchInputs:
    """Every check of the request that needs no write, in the order the user meets them."""
    part = Shard.parse(settings.shard)
    if overwrite and not part.whole:
        raise DitfError("--overwrite with --shard would let one shard delete another's predictions: "
                        "run `ditf match --overwrite` once without --shard (or not at all), then the shards")
    device = resolve_match_device(settings.device)
    if settings.jobs is not None and int(settings.jobs) < 1:
        raise DitfError(f"--jobs must be at least 1, got {settings.jobs}")
    if settings.variant not in variant_names():
        raise unknown("variant", settings.variant, variant_names())
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
    # one job on a GPU (the device is the parallel part) and with --fuse (its partner's cache is
    # opened in this process, not in the workers)
    jobs = 1 if device.type != "cpu" or settings.fuse else planned_jobs(settings)
    return MatchInputs((dataset.name, model, k, t), arrays, rows, list(pairs), device, jobs, part)
