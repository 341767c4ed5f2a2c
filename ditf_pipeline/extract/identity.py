"""What makes a feature key: the configuration every key records, compared before any reuse.

Two runs share a key (dataset, model, k, t) only when they compute the same numbers. What fixes
the numbers (checkpoint, architecture, dtype, image size and resize rule, ensemble, seed, prompt,
precision ...) is the key's `store_config`, written when the key is created; a later run with a
different one is refused with the settings that differ (`check_same_config`), never appended to.
How the run went (library versions, device, batching, compile) is `provenance`: recorded, never
compared.
"""

from __future__ import annotations

import platform
import time

import torch

from ..core.images import orientation_label
from ..core.version import SCHEMA_VERSION, __version__
from ..models.base import CompileOptions, DiTAdapter
from ..store.schema import refuse_other_config
from .prompts import prompt_identity
from .settings import ExtractSettings, batch_images, compiles

__all__ = ["RESIZE_RULE", "VAE_SAMPLING", "adaln_names", "check_same_config", "comparable_config",
           "modulation_names", "provenance", "store_config"]


#: How ensemble member m's posterior sample and noise are drawn (recorded in every key's config)
VAE_SAMPLING = "vae once per image; member m: eps then noise from seed(seed, key, t, m), float32 on the CPU"

#: Which arithmetic `images.model_size` follows (recorded so keys of the older rule are refused)
RESIZE_RULE = "authors': long side int(round(side*scale/16))*16 (half to even); short side (size*long)/short floored"


def store_config(adapter: DiTAdapter, settings: ExtractSettings) -> dict:
    """The configuration of every key this run writes: everything that fixes the numbers."""
    return {
        "model": adapter.spec.name,
        "family": adapter.spec.family,
        # read from the loaded checkpoint: a --weights folder of another width or depth never shares a key
        "architecture": adapter.architecture.as_config(),
        "source": adapter.source or "built-in random weights (seeded)",
        "revision": adapter.revision,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "img_size": settings.img_size,
        "resize_side": settings.resize,
        "resize_rule": RESIZE_RULE,
        "resample": settings.resample,
        "orientation": orientation_label(settings.exif_transpose),
        **adapter.input_config(),  # "resize" (and the pixel normalisation where not [-1, 1])
        "vae_dtype": str(adapter.vae_dtype).replace("torch.", "") if adapter.vae_dtype is not None else None,
        "vae_sampling": VAE_SAMPLING if adapter.stochastic else None,
        "precision": settings.precision,
        "patch_stride": adapter.patch_stride,
        "ensemble_size": settings.ensemble_size,
        "seed": settings.seed,
        "prompt": prompt_identity(settings.prompt),
        "guidance": adapter.spec.guidance,
        "schema_version": SCHEMA_VERSION,
    }


def comparable_config(config: dict, stored: dict | None) -> dict:
    """`config` as it is compared with a key's `stored` config.

    A key whose config does not record the orientation read every image with the EXIF tag
    applied; for every file without an orientation tag (the benchmarks' images) that is the
    same pixels, so such a key is resumed as it is, and keeps its config.
    """
    if stored is not None and "orientation" not in stored:
        return {name: value for name, value in config.items() if name != "orientation"}
    return config



def check_same_config(store: str, key: str, stored: dict, config: dict) -> None:
    """Refuse to reuse `key` of `store` when its `stored` config differs from this run's `config`.

    Called before the image index grows, so a refused run leaves the store as it was (the store
    checks again when the key is opened for writing).
    """
    refuse_other_config(store, key, stored, comparable_config(config, stored))


def provenance(adapter: DiTAdapter, settings: ExtractSettings, compile_options: CompileOptions) -> dict:
    """How this run goes (libraries, device, batching, compile): recorded with the key, never compared."""
    from importlib.metadata import version

    import diffusers
    import transformers

    return {
        "ditf": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "zarr": version("zarr"),  # read from the metadata: only store/ imports zarr
        "python": platform.python_version(),
        "device": str(adapter.device),
        "text_device": str(adapter.text_device),
        "offload": adapter.offload,
        "batch_size": settings.batch_size,
        "batch_images": batch_images(adapter, settings),
        "compile": f"{compile_options.backend} (per block)" if compiles(adapter, settings) else "off",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def adaln_names(adapter: DiTAdapter) -> list[str]:
    """The vectors each block's modulation stores: shift, scale, gate after a LayerNorm; scale,
    gate and the norm's learned weight after a scale-only RMSNorm (no shift is stored at all)."""
    return ["shift", "scale", "gate"] if adapter.modulated_norm == "layer" else ["scale", "gate", "norm_weight"]


def modulation_names(adapter: DiTAdapter) -> list[str]:
    """The conditioning-ablation vectors stored besides `adaln_names`."""
    if not adapter.has_adaln:
        return []
    base = [name for name in adaln_names(adapter) if name != "norm_weight"]
    names = [f"{name}_t" for name in base]
    if adapter.separates_conditioning:
        names += [f"{name}_c" for name in base]
    return names

