"""`ditf export`: one file per image of any cached variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .commands import DEFAULT_STORE, single_key

__all__ = ["run_export"]

if TYPE_CHECKING:
    from ..match.export import ExportReport


def run_export(
    *,
    out: str | Path,
    model: str,
    dataset: str,
    store: str | Path = DEFAULT_STORE,
    k: Sequence[int] | int | None = None,
    t: Sequence[int] | int | None = None,
    variant: str = "adaln+cd",
    fmt: str = "safetensors",
    channels: str = "auto",
    images: Sequence[str] | None = None,
) -> ExportReport:
    """Write each image's features of one variant to its own file in `out`.

    The key is chosen by the rule of every command (`selection.select_key`): the model's
    default key when stored, else the only one, else an error listing them.
    """
    from ..match.export import export_features
    from ..selection import select_key
    from ..store.feature_store import FeatureStore

    k_, t_ = select_key(FeatureStore(store, read_only=True), dataset, model, *single_key(k, t))
    return export_features(store, dataset, model, out, k_, t_, variant, fmt, channels,
                           list(images) if images is not None else None)
