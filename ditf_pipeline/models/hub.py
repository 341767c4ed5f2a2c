"""How ditf meets the Hugging Face hub: the offline switch and the no-pickle rule for weights.

One place for both, so every adapter reads `HF_HUB_OFFLINE` exactly as huggingface_hub does
(`HF_HUB_OFFLINE=0`, `no` or `false` mean online; only 1/ON/YES/TRUE mean offline) and refuses
pickled weights with the same one-line error. No torch, no diffusers here.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import DitfError

#: huggingface_hub's own truthy values (its `constants.ENV_VARS_TRUE_VALUES`), used if it moves
_TRUE = {"1", "ON", "YES", "TRUE"}

#: file endings of pickled weights (torch.load / pickle): never loaded by ditf
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _is_true(value: str | None) -> bool:
    """huggingface_hub's parser of boolean environment variables (its private `_is_true`)."""
    try:
        from huggingface_hub.constants import _is_true as hub_is_true
    except ImportError:  # pragma: no cover - a huggingface_hub that renamed it
        return value is not None and value.upper() in _TRUE
    return bool(hub_is_true(value))


def offline() -> bool:
    """True when the hub must not be contacted, read now as huggingface_hub reads it at import
    (`HF_HUB_OFFLINE`, else `TRANSFORMERS_OFFLINE`)."""
    return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def looks_local(source: str) -> bool:
    """A --weights value that names a folder rather than a hub id."""
    path = Path(source)
    return path.is_absolute() or source.startswith(".") or path.exists()


def refuse_pickled(folder: str | Path, option: str = "--weights") -> None:
    """Raise a one-line DitfError if any folder under `folder` holds pickled weights and no
    safetensors: loading those would run pickle (arbitrary code); ditf loads safetensors only."""
    root = Path(folder)
    if not root.is_dir():
        return
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        files = [p.name for p in directory.iterdir() if p.is_file()]
        pickled = sorted(name for name in files if name.endswith(PICKLED))
        if pickled and not any(name.endswith(".safetensors") for name in files):
            raise DitfError(
                f"{option} {folder}: {directory} holds only pickled weights ({pickled[0]}); ditf loads safetensors "
                "only: convert them (load and save_pretrained(..., safe_serialization=True) where you trust the file)"
            )
