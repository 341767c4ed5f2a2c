"""Dataset registry: `get_dataset(name, root, split)` for every reader in this package.

Adding a benchmark is one file here defining a `Dataset` subclass decorated with
`@register` (its class attribute `name` is the registry key); modules are discovered
automatically on first use, so no list needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from ..core.errors import DitfError
from .base import Dataset, ImageRecord, Pair

__all__ = ["Dataset", "ImageRecord", "Pair", "dataset_names", "get_dataset", "register"]

_REGISTRY: dict[str, type[Dataset]] = {}
_DISCOVERED = False


def register(cls: type[Dataset]) -> type[Dataset]:
    """Class decorator: make a `Dataset` subclass reachable as ``get_dataset(cls.name, ...)``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"dataset name {cls.name!r} registered twice ({existing.__qualname__}, {cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base" and not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _DISCOVERED = True


def dataset_names() -> list[str]:
    """Registered dataset names, sorted (for ``--dataset`` choices and error messages)."""
    _discover()
    return sorted(_REGISTRY)


def get_dataset(name: str, root: Path | str, split: str | None = None, **options: Any) -> Dataset:
    """Build the reader `name` over `root`; `options` go to the reader (e.g. ``category=``).

    Checks the name and the root here so that every reader fails the same way on the two most
    common mistakes (a typo in ``--dataset``, a wrong ``--root``).
    """
    _discover()
    if name not in _REGISTRY:
        from ..core.errors import unknown

        raise unknown("dataset", name, dataset_names())
    root = Path(root)
    if not root.exists():
        raise DitfError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DitfError(f"dataset root {root} is not a directory")
    try:
        return _REGISTRY[name](root, split=split, **options)
    except TypeError as exc:
        if options and "unexpected keyword argument" in str(exc):
            raise DitfError(f"dataset {name!r} does not accept option(s) {', '.join(sorted(options))}") from exc
        raise
