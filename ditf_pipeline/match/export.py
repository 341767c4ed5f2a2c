"""Per-image export of cached features, for code that expects one file per image.

`ditf export` writes each image's feature map of one variant, (C, h, w) float32 on the model's
token grid, as ``OUT/<image key>.safetensors`` (metadata in the file's header) or
``OUT/<image key>.npy`` with a ``.json`` sidecar. The metadata says what the numbers are
(model, k, t, variant, discarded channels, the grid and the original image size, and the
store's extraction settings), so a file is self-describing without the store. The features
are computed by the match stage's own code (`feature_maps`, which `api.FeatureStoreReader`
uses too), so an exported file equals what `DiTF.features` and `ditf match` use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ..core.version import __version__
from ..core.errors import DitfError
from ..store.feature_store import FeatureArrays, FeatureStore
from .features import USES_CHANNELS, check_variant_applies
from .inputs import resolve_channels
from .predict import FeatureCache

if TYPE_CHECKING:
    import torch

FORMATS = ("safetensors", "npy")

__all__ = ["FORMATS", "ExportReport", "export_features", "feature_maps"]


def feature_maps(arrays: FeatureArrays, rows: dict[str, int], keys: Sequence[str], variant: str,
                 channels: str | Sequence[int]) -> list[torch.Tensor]:
    """(h, w, D) float32 maps of `keys`, computed exactly as the match stage computes them.

    `channels` is a `--channels` spec ("auto", "none", "3,4") or the channel indices to discard.

    Raises
    ------
    DitfError
        When the variant needs AdaLN vectors the key lacks, or an image has no features.
    """
    check_variant_applies(variant, bool(arrays.modulation_names))
    spec = channels if isinstance(channels, str) else ",".join(str(int(c)) for c in channels) or "none"
    discarded = resolve_channels(spec, arrays) if variant in USES_CHANNELS else []
    missing = [key for key in keys if key not in rows]
    if missing:
        raise DitfError(f"image {missing[0]!r} has no features in {arrays.path}")
    cache = FeatureCache(arrays, rows, variant, discarded)
    return [cache(key) for key in keys]


@dataclass
class ExportReport:
    out: Path
    files: int
    fmt: str

    def line(self) -> str:
        return f"export: {self.files} file(s) ({self.fmt}) -> {self.out}"


def _target(out: Path, key: str, suffix: str) -> Path:
    """OUT/<key><suffix>, refusing keys that would leave OUT (".." or absolute parts)."""
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise DitfError(f"image key {key!r} cannot be used as a file name")
    return out.joinpath(*parts[:-1], parts[-1] + suffix)


def export_features(
    store: str | Path,
    dataset: str,
    model: str,
    out: str | Path,
    k: int | None = None,
    t: int | None = None,
    variant: str = "adaln+cd",
    fmt: str = "safetensors",
    channels: str = "auto",
    images: list[str] | None = None,
) -> ExportReport:
    """Write one file per extracted image of (dataset, model, k, t) in `store` to `out`.

    `dataset` is the name the store files the images under (the `--dataset` of the extract
    run, e.g. "spair" or "folder"); `images` restricts the export to those keys.
    """
    if fmt not in FORMATS:
        raise DitfError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    feature_store = FeatureStore(store, read_only=True)
    k, t = feature_store.find_feature_key(dataset, model, k, t)
    arrays = feature_store.open_features(dataset, model, k, t)
    rows = feature_store.image_rows(dataset)
    complete = arrays.complete()
    keys = [key for key in sorted(rows, key=rows.__getitem__) if rows[key] < len(complete) and complete[rows[key]]]
    if images is not None:
        unknown = [key for key in images if key not in keys]
        if unknown:
            raise DitfError(f"image {unknown[0]!r} has no extracted features in {arrays.path}")
        keys = list(images)
    if not keys:
        raise DitfError(f"no extracted images in {arrays.path}")
    discarded = resolve_channels(channels, arrays) if variant in USES_CHANNELS else []
    targets = [_target(Path(out), key, "." + fmt) for key in keys]  # all names checked before writing
    maps = feature_maps(arrays, rows, keys, variant, discarded or "none")
    settings = {
        "ditf": __version__, "store": str(feature_store.path), "dataset": dataset, "model": model, "k": k, "t": t,
        "variant": variant, "channels": discarded, "layout": "CHW float32 (channels, grid rows, grid cols)",
        "extract": arrays.config,
    }
    for key, target, feature in zip(keys, targets, maps):
        tensor = feature.permute(2, 0, 1).contiguous()
        meta = {**settings, "image": key, "grid": [int(tensor.shape[1]), int(tensor.shape[2])]}
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({"features": tensor}, str(target),
                      metadata={name: json.dumps(value) for name, value in meta.items()})
        else:
            np.save(target, tensor.numpy())
            target.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ExportReport(out=Path(out), files=len(keys), fmt=fmt)
