"""ditf: Diffusion Transformer Features (DiTF), extracted once, cached in Zarr, matched and scored.

From Python::

    from ditf_pipeline import DiTF, open_store
    model = DiTF.from_pretrained("flux")                      # or "tiny-flux", dtype="bf16", weights="DIR"
    feats = model.features([img_a, img_b], prompt="a photo of a cat")   # list of (C, h, w) tensors
    points = model.match(img_a, img_b, [(120, 80), (200, 150)])          # DIFT nearest neighbours
    f = open_store("stores/ditf.zarr").features("spair", "flux", variant="adaln+cd", image="cat/2008_000033")

The package mirrors the data flow: `datasets` (readers) -> `models` (one adapter per DiT family)
-> `extract` -> `store` (the only module that touches Zarr) -> `features` (variants computed
from the cache) -> `match` -> `score` -> `report`. The public names below are imported on
first use, so `import ditf_pipeline` stays light (scoring works without torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import SCHEMA_VERSION, __version__

#: public name -> module that defines it (imported lazily by `__getattr__`)
_LAZY = {
    "DiTF": "api",
    "open_store": "api",
    "FeatureStoreReader": "api",
    "image_key": "api",
    "run_extract": "pipeline",
    "export_features": "match.export",
    "compute_feature": "match.features",
    "variant_names": "match.features",
    "DitfError": "core.errors",
}

__all__ = ["SCHEMA_VERSION", "__version__", *sorted(_LAZY)]

if TYPE_CHECKING:  # what `__getattr__` imports on first use, spelled out for type checkers
    from .api import DiTF as DiTF, FeatureStoreReader as FeatureStoreReader, image_key as image_key
    from .api import open_store as open_store
    from .core.errors import DitfError as DitfError
    from .match.export import export_features as export_features
    from .match.features import compute_feature as compute_feature, variant_names as variant_names
    from .pipeline import run_extract as run_extract


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
