"""`ditf pack`: chosen keys of a store into a new store ready to publish."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["run_pack"]


def run_pack(*, store: Path | str, out: Path, dataset: str | None = None, model: str | None = None,
             k: int | None = None, t: int | None = None, predictions: bool = True, license: str | None = None,
             note: Callable[[str], None] | None = None) -> dict:
    """`ditf pack`: copy the chosen keys of `store` into `out` (store, manifest, dataset card).

    The sizes are told to `note` before anything is copied; returns the manifest.
    """
    from ..core.version import __version__
    from ..store.card import card
    from ..store.feature_store import FeatureStore
    from ..store.pack import check_out, plan_pack, write_pack

    check_out(Path(out))
    source = FeatureStore(store, read_only=True)
    plan = plan_pack(source, dataset=dataset, model=model, k=k, t=t, predictions=predictions)
    if note is not None:
        for item in plan.items:
            note(f"pack: {item.node}: {len(item.files)} file(s), {item.bytes / 1e6:.1f} MB")
        note(f"pack: {plan.bytes / 1e6:.1f} MB in all, into {out}")
    keys = [{"node": item.node, "images": item.images, "bytes": item.bytes, "config": item.config,
             "predictions": item.predictions} for item in plan.keys()]
    text = card(keys, version=__version__, total_bytes=plan.bytes, license=license)
    return write_pack(plan, Path(out), text, version=__version__, progress=note)
