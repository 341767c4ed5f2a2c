"""Feature variants computed at match time from the cached raw stream and AdaLN vectors.

The cache holds the pre-AdaLN residual stream z of block k and that block's modulation
vectors (they depend on (t, c) only, not on the image). Every ablation of the paper (original,
+AdaLN, +channel discard in either order, AdaLN conditioned on t or c alone) is therefore a
cheap per-token function of cached arrays, named here so that a score can record exactly which
one produced it.

Variants (stable names, written into every result):

* ``raw``            z itself (the paper's "original" features)
* ``adaln``          (1 + scale) * LayerNorm(z) + shift
* ``adaln+cd``       zero the discarded channels of z, THEN LayerNorm + modulation
                     (the order of the authors' public script; our default)
* ``adaln+cd-post``  LayerNorm + modulation, then zero the channels (the paper's wording)
* ``adaln-t``        AdaLN with (shift_t, scale_t), regressed from the timestep only
* ``adaln-c``        AdaLN with (shift_c, scale_c), regressed from the condition only

LayerNorm is affine-free with eps 1e-6, as in every DiT block (`ditf_pipeline.adaln.layer_norm`, which
the model adapters share with this module, so the match stage never depends on the model package).

Scale-only RMSNorm families (Lumina-Image 2.0, Z-Image; key config ``"norm": "rms"``) store no
shift but the norm's learned weight as the vector ``norm_weight``; for their keys every AdaLN
variant applies ``rmsnorm(z) * norm_weight * (1 + scale)`` (`ditf_pipeline.adaln.rms_norm`) in
place of ``(1 + scale) * LayerNorm(z) + shift``: the stored vectors say which norm applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch


from ..adaln import layer_norm, rms_norm
from ..core.errors import DitfError

#: Modulation vectors as they come out of the store: name -> (D,) array or tensor.
ModulationVectors = Mapping[str, "np.ndarray | torch.Tensor"]

#: The paper's massive-activation criterion: mean |z| over tokens above 100x the median.
MASSIVE_RATIO = 100.0


def _vector(modulation: ModulationVectors, name: str, dim: int) -> torch.Tensor:
    """Fetch one (D,) modulation vector as float32, with an error that says what is missing."""
    if name not in modulation:
        raise DitfError(
            f"modulation vector {name!r} is missing (have: {', '.join(sorted(modulation)) or 'none'})"
        )
    vector = torch.as_tensor(modulation[name]).to(torch.float32).reshape(-1)
    if vector.numel() != dim:
        raise DitfError(f"modulation vector {name!r} has {vector.numel()} entries, the feature has {dim} channels")
    return vector


def _adaln(pre_adaln: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(z) + shift over the last axis, float32 (in place on the LayerNorm
    output: the same operations in the same order, one map allocated instead of three)."""
    return layer_norm(pre_adaln.to(torch.float32)).mul_(1 + scale).add_(shift)


def _modulated(pre_adaln: torch.Tensor, modulation: ModulationVectors, suffix: str = "") -> torch.Tensor:
    """The block's modulated norm applied to z, LayerNorm or scale-only RMSNorm as the key stored
    (`suffix` picks the conditioning-ablation vectors, e.g. "_t")."""
    d = pre_adaln.shape[-1]
    scale = _vector(modulation, f"scale{suffix}", d)
    if "norm_weight" in modulation:
        return rms_norm(pre_adaln, _vector(modulation, "norm_weight", d)).mul_(1 + scale)
    return _adaln(pre_adaln, _vector(modulation, f"shift{suffix}", d), scale)


def _check_channels(channels: Sequence[int], dim: int) -> list[int]:
    channels = [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < dim]
    if bad:
        raise DitfError(f"discarded channel {bad[0]} is out of range (the feature has channels 0..{dim - 1})")
    return channels


def _zero_channels(feature: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """A copy of `feature` with `channels` set to zero (never modifies the cached array)."""
    out = feature.to(torch.float32, copy=True)
    if len(channels):
        out[..., list(channels)] = 0
    return out


def _raw(z, modulation, channels):
    return z.to(torch.float32)


def _adaln_tc(z, modulation, channels):
    return _modulated(z, modulation)


def _adaln_cd_pre(z, modulation, channels):
    return _modulated(_zero_channels(z, channels), modulation)


def _adaln_cd_post(z, modulation, channels):
    return _zero_channels(_adaln_tc(z, modulation, channels), channels)


def _adaln_t(z, modulation, channels):
    return _modulated(z, modulation, "_t")


def _adaln_c(z, modulation, channels):
    return _modulated(z, modulation, "_c")


VariantFn = Callable[[torch.Tensor, ModulationVectors, Sequence[int]], torch.Tensor]

#: name -> function(pre_adaln, modulation, discarded_channels) -> float32 feature
VARIANTS: dict[str, VariantFn] = {
    "raw": _raw,
    "adaln": _adaln_tc,
    "adaln+cd": _adaln_cd_pre,
    "adaln+cd-post": _adaln_cd_post,
    "adaln-t": _adaln_t,
    "adaln-c": _adaln_c,
}

#: variants that read the discarded-channel list
USES_CHANNELS = frozenset({"adaln+cd", "adaln+cd-post"})

#: the AdaLN vectors each variant reads (the store reads just these: 2 of up to 9 per image;
#: a key has either the shifts or `norm_weight`, and only those it has are read)
VECTORS_USED: dict[str, tuple[str, ...]] = {
    "raw": (),
    "adaln": ("shift", "scale", "norm_weight"),
    "adaln+cd": ("shift", "scale", "norm_weight"),
    "adaln+cd-post": ("shift", "scale", "norm_weight"),
    "adaln-t": ("shift_t", "scale_t", "norm_weight"),
    "adaln-c": ("shift_c", "scale_c", "norm_weight"),
}


def variant_names() -> list[str]:
    return list(VARIANTS)


def check_variant_applies(variant: str, has_modulation: bool) -> None:
    """Every variant but ``raw`` needs AdaLN vectors; keys of models without AdaLN have none."""
    if variant != "raw" and not has_modulation:
        raise DitfError(
            f"feature variant {variant!r} needs the AdaLN modulation vectors, and these features have none "
            "(a model without AdaLN, e.g. DINOv2 or the SD UNet of DIFT): use variant 'raw'"
        )


def compute_feature(
    variant: str,
    pre_adaln: torch.Tensor | np.ndarray,
    modulation: ModulationVectors | None = None,
    channels: Sequence[int] = (),
) -> torch.Tensor:
    """The matching feature of one image: (h, w, D) (or (n, D)) float32 tensor.

    `pre_adaln` is the valid region of the cached raw stream z (float16 or float32);
    `modulation` maps "shift", "scale", "gate", "shift_t", "scale_t", "shift_c", "scale_c"
    (and "norm_weight" for scale-only RMSNorm keys, which have no shifts) to (D,) vectors (only those the variant needs are read); `channels` lists the discarded
    channels (used by the ``+cd`` variants only).
    """
    if variant not in VARIANTS:
        raise DitfError(f"unknown feature variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    z = torch.as_tensor(pre_adaln)
    if z.ndim < 2:
        raise DitfError(f"pre-AdaLN feature must be (h, w, D) or (n, D), got shape {tuple(z.shape)}")
    check_variant_applies(variant, bool(modulation))
    channels = _check_channels(channels, z.shape[-1])
    return VARIANTS[variant](z, modulation or {}, channels)


def detect_massive_channels(pre_adaln: torch.Tensor | np.ndarray, ratio: float = MASSIVE_RATIO) -> list[int]:
    """Channels whose mean |z| over all tokens exceeds `ratio` x the median of those means.

    This is the paper's criterion for massive activations (a few channels ~100x the median, on
    every token); `--channels auto` uses it on the raw stream of the image(s) at hand.
    """
    z = torch.as_tensor(pre_adaln).to(torch.float32)
    per_channel = z.reshape(-1, z.shape[-1]).abs().mean(dim=0)
    return massive_from_means(per_channel.numpy(), ratio)


def massive_from_means(channel_means: np.ndarray, ratio: float = MASSIVE_RATIO) -> list[int]:
    """The 100x-median rule on per-channel mean |z| (numpy's true median: torch.median returns
    the lower middle value for an even count)."""
    means = np.asarray(channel_means, dtype=np.float64)
    median = float(np.median(means))
    return [int(c) for c in np.flatnonzero(means > ratio * median)]


class ChannelMeans:
    """Running per-channel mean |z| over the tokens of many images, one image at a time.

    Why: concatenating the tokens of 32 images before taking one mean would hold 0.7 GB at SPair
    size; a float64 running sum needs one (D,) vector whatever the sample.
    """

    def __init__(self, dim: int) -> None:
        self.total = np.zeros(dim, dtype=np.float64)
        self.tokens = 0

    def add(self, pre_adaln: torch.Tensor | np.ndarray) -> None:
        z = torch.as_tensor(pre_adaln)
        flat = z.reshape(-1, z.shape[-1])
        for part in flat.split(256):  # a few MB of float64 at a time
            self.total += part.to(torch.float64).abs_().sum(dim=0).numpy()
        self.tokens += flat.shape[0]

    def means(self) -> np.ndarray:
        return self.total / max(self.tokens, 1)

    def massive(self, ratio: float = MASSIVE_RATIO) -> list[int]:
        return massive_from_means(self.means(), ratio) if self.tokens else []
