"""Model registry: every module in this package registers the `ModelSpec`s it serves.

Adding a DiT family is one file here that defines a `DiTAdapter` subclass and calls
`register(spec, AdapterClass)` at import time.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from ..errors import DitfError
from .base import DiTAdapter, ModelSpec

_REGISTRY: dict[str, tuple[ModelSpec, type[DiTAdapter]]] = {}
_DISCOVERED = False

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def register(spec: ModelSpec, adapter_cls: type[DiTAdapter]) -> None:
    _REGISTRY[spec.name] = (spec, adapter_cls)


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        for module in pkgutil.iter_modules(__path__):
            if module.name not in ("base",) and not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _DISCOVERED = True


def model_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _discover()
    if name not in _REGISTRY:
        raise DitfError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return _REGISTRY[name][0]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_adapter(
    name: str,
    weights: str | None = None,
    revision: str | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    text_device: str | None = None,
    offload: bool = False,
) -> DiTAdapter:
    """Build the adapter for a registered model; weights are loaded lazily on first use.

    `text_device`: where the text encoders run (default: `device`); `offload`: keep the DiT's
    blocks in host memory and move one at a time to `device` (for GPUs smaller than the blocks).
    """
    spec = get_spec(name)
    if dtype not in DTYPES:
        raise DitfError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    adapter_cls = _REGISTRY[name][1]
    return adapter_cls(
        spec, weights=weights, revision=revision, dtype=DTYPES[dtype], device=resolve_device(device),
        text_device=resolve_device(text_device) if text_device else None, offload=offload,
    )
