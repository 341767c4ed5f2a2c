"""Checks of user input that run before anything is written.

Every command validates all of its arguments first, so a bad value costs one `error:` line
and leaves the store exactly as it was (a run that writes half its work and then refuses
would leave a key configured with the bad value, refusing every later valid run).

Torch-free and zarr-free: the scorer uses these checks too. Names the user types (models,
datasets, variants, protocols) get a "did you mean" from `difflib`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .core.errors import DitfError, did_you_mean, unknown  # noqa: F401  (re-exported)
from .core.naming import PROTOCOLS  # noqa: F401  (re-exported)

#: the feature variants `features.VARIANTS` computes (kept here, torch-free; a test pins equality)
VARIANTS = ("raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c")


# ---- names -------------------------------------------------------------------------------------
def check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise unknown(what, value, choices)
    return value


def check_variants(variants: Iterable[str]) -> list[str]:
    return [check_choice("variant", v, VARIANTS) for v in variants]


def supported_variants(modulation_names: Sequence[str]) -> list[str]:
    """The variants stored vectors allow: `raw` only without AdaLN; `adaln-t`/`adaln-c` only
    when the t-only / c-only vectors were stored (PixArt's AdaLN sees t only). Scale-only
    RMSNorm keys store scales and the norm's weight, never a shift."""
    if "scale" not in modulation_names:
        return ["raw"]
    return [v for v in VARIANTS if not v.startswith("adaln-") or f"scale_{v[-1]}" in modulation_names]


def check_variant_supported(variant: str, model: str, modulation_names: Sequence[str]) -> None:
    """A known variant the key's features cannot produce (e.g. adaln of DINOv2): say why."""
    supported = supported_variants(modulation_names)
    if variant in supported:
        return
    if supported == ["raw"]:
        why = f"{model} has no AdaLN, so its features support variant 'raw' only"
    else:
        why = f"{model} stored no {variant[-1]}-only AdaLN vectors; its features support {', '.join(supported)}"
    raise DitfError(f"variant {variant!r} is not available: {why}")


def check_protocol(protocol: str) -> str:
    return check_choice("protocol", protocol, PROTOCOLS)


# ---- numbers -----------------------------------------------------------------------------------
def check_at_least(flag: str, value: int | None, minimum: int = 1) -> None:
    """`None` means "not given" (the default applies); anything given must be >= minimum."""
    if value is not None and value < minimum:
        raise DitfError(f"{flag} must be at least {minimum}, got {value}")


def check_alphas(alphas: Iterable[float] | None, flag: str = "--alpha") -> None:
    for alpha in alphas or ():
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 < alpha <= 1):
            raise DitfError(f"{flag} must be a number with 0 < alpha <= 1 (a fraction of the threshold length), got {alpha}")


def check_timesteps(ts: Iterable[int] | None) -> None:
    for t in ts or ():
        if not 0 <= t < 1000:
            raise DitfError(f"--t must be a timestep in 0..999, got {t}")


def check_blocks(ks: Iterable[int] | None) -> None:
    """Only the sign here; the model's block count is checked by its adapter."""
    for k in ks or ():
        if k < 0:
            raise DitfError(f"--k must be a block index >= 0, got {k}")


def check_img_size(img_size: int | None, patch_stride: int) -> None:
    """At least one patch; sides are rounded to the nearest multiple of the patch stride."""
    if img_size is not None and img_size < patch_stride:
        raise DitfError(
            f"--img-size must be at least the model's patch stride {patch_stride} "
            f"(sides are rounded to multiples of {patch_stride}), got {img_size}"
        )


# ---- files -------------------------------------------------------------------------------------
def _writable_folder(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` if files can be created in it, else None.

    Probed with a temporary file that is removed at once: permission bits say nothing for root
    or on read-only and pseudo file systems (/proc).
    """
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                return None
            try:
                with tempfile.TemporaryFile(dir=parent):
                    return parent
            except OSError:
                return None
    return None


def check_output_file(path: Path | None, flag: str = "--out", suffix: str | None = None) -> None:
    """A file we will write later: not a folder, its folder creatable and writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise DitfError(f"{flag} {path} is a directory; give a file name")
    if suffix and path.suffix.lower() != suffix:
        raise DitfError(f"{flag} must be a {suffix} file, got {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise DitfError(f"{flag} {path} is not writable")
    if _writable_folder(path.parent) is None:
        raise DitfError(f"{flag} {path}: cannot write into {path.parent} (not a writable folder)")


def check_output_folder(path: Path | None, flag: str = "--out") -> None:
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DitfError(f"{flag} {path} is a file; give a folder")
    if _writable_folder(path) is None:
        raise DitfError(f"{flag} {path}: not a writable folder")
