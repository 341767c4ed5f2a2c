"""Generators of small datasets in each benchmark's real on-disk layout, with known answers.

`ditf demo` and the tests of every stage use them; each module here writes one benchmark's
layout (`make_demo("spair", root)` dispatches by dataset name).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..core.errors import DitfError
from .spair import make_spair_demo

_GENERATORS = {"spair": ("spair", "make_spair_demo")}


def register_generator(dataset: str, module: str, function: str) -> None:
    _GENERATORS[dataset] = (module, function)


register_generator("pfpascal", "pfpascal", "make_pfpascal_demo")
register_generator("ap10k", "ap10k", "make_ap10k_demo")
register_generator("davis", "davis", "make_davis_demo")
register_generator("hpatches", "hpatches", "make_hpatches_demo")
register_generator("ade20k", "ade20k", "make_ade20k_demo")


def demo_names() -> list[str]:
    return sorted(_GENERATORS)


def make_demo(dataset: str, root: Path | str, **options) -> Path:
    """Write the demo dataset of `dataset` under `root` and return the root."""
    if dataset not in _GENERATORS:
        raise DitfError(f"no demo data for dataset {dataset!r}; available: {', '.join(demo_names())}")
    module, function = _GENERATORS[dataset]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)(root, **options)


__all__ = ["make_demo", "make_spair_demo", "demo_names"]
