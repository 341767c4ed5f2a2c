"""Model registry: every module in this package registers the `ModelSpec`s it serves.

Adding a DiT family is one file here that defines a `DiTAdapter` subclass and calls
`register(spec, AdapterClass)` at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator

import torch

from ..devices import resolve_device  # noqa: F401  (re-exported: `models.resolve_device`)
from ..core.errors import DitfError
from .base import DiTAdapter, ModelSpec

_REGISTRY: dict[str, tuple[ModelSpec, type[DiTAdapter]]] = {}
_DISCOVERED = False

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def register(spec: ModelSpec, adapter_cls: type[DiTAdapter]) -> None:
    _REGISTRY[spec.name] = (spec, adapter_cls)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' and diffusers' loggers at error level, and their progress bars off, for the calls inside.

    Importing the diffusers pipelines (at model discovery) makes transformers log advice that is
    not for our users, e.g. "`CLIPImageProcessor` requires torchvision ... falling back", and
    loading a checkpoint draws per-component bars; the settings are restored afterwards, so a
    caller's own logging settings are left alone.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        with quiet_libraries():
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
        from ..core.errors import unknown

        raise unknown("model", name, model_names())
    return _REGISTRY[name][0]


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
