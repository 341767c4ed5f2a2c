"""Per-image export of cached features, for code that expects one file per image.

`ditf export` writes each image's feature map of one variant, (C, h, w) float32 on the model's
token grid, as ``OUT/<image key>.safetensors`` (metadata in the file's header) or
``OUT/<image key>.npy`` with a ``.json`` sidecar. The metadata says what the numbers are
(model, k, t, variant, discarded channels, the grid and the original image size, and the
store's extraction settings), so a file is self-describing without the store. The features
are computed by the match stage's own code (`api.FeatureStoreReader`), so an exported file
equals what `DiTF.features` and `ditf match` use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .. import __version__
from ..core.errors import DitfError

FORMATS = ("safetensors", "npy")

__all__ = ["FORMATS", "ExportReport", "export_features"]


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
    from ..api import FeatureStoreReader

    if fmt not in FORMATS:
        raise DitfError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    reader = FeatureStoreReader(store)
    k, t = reader.store.find_feature_key(dataset, model, k, t)
    arrays = reader.store.open_features(dataset, model, k, t)
    rows = reader.store.image_rows(dataset)
    complete = arrays.complete()
    keys = [key for key in sorted(rows, key=rows.__getitem__) if rows[key] < len(complete) and complete[rows[key]]]
    if images is not None:
        unknown = [key for key in images if key not in keys]
        if unknown:
            raise DitfError(f"image {unknown[0]!r} has no extracted features in {arrays.path}")
        keys = list(images)
    if not keys:
        raise DitfError(f"no extracted images in {arrays.path}")
    from ..match.features import USES_CHANNELS
    from ..match.predict import resolve_channels

    discarded = resolve_channels(channels, arrays) if variant in USES_CHANNELS else []
    targets = [_target(Path(out), key, "." + fmt) for key in keys]  # all names checked before writing
    maps = reader.feature_maps(dataset, model, k, t, variant, keys, discarded or "none")
    settings = {
        "ditf": __version__, "store": str(reader.path), "dataset": dataset, "model": model, "k": k, "t": t,
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
