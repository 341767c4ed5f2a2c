"""`--precision paper` at match time: the authors' reduced-precision arithmetic, cast for cast.

DiTF's `eval_spair.py` keeps the ensemble-mean feature z and the AdaLN vectors in bf16 (its
DiT runs in bf16), zeroes the discarded channels, applies the affine-free LayerNorm and
``(1 + scale) * x + shift`` on bf16 tensors, casts the result to fp16, upsamples both maps
bilinearly (align_corners=False) to the original image sizes in fp16, L2-normalises the source
vector and every target pixel in fp16 (``F.normalize``, eps 1e-12) and takes the cosine as an
fp16 matrix product; the prediction is the first maximum in row-major order.

Keys extracted with ``--precision paper`` store z rounded to bf16 (held exactly by the fp16
store) and bf16-rounded modulation vectors, so these casts see the authors' numbers. The
default path (`features.compute_feature` + `match.DiftMatcher`) is float32 arithmetic on the
same stored values; this module is the dtype switch `predict` takes for paper keys.

On the CPU, torch 2.13 runs every op here natively in bf16 / fp16 (no emulation), with
float32 accumulation inside LayerNorm, norms and the matrix product, as CUDA kernels do; the
order of those accumulations is the backend's, so results can differ from a GPU run in the
last bit of an fp16 score (and hence on exact ties). Cost: the whole target map is upsampled
(D x H x W fp16, about 1.2 GB for Flux at 500 x 375), as in the authors' script.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DitfError
from ..adaln import RMS_EPS
from .features import check_variant_applies, variant_names

#: variant -> (shift name, scale name, where channels are zeroed: "pre" LayerNorm, "post", None)
_PAPER_VARIANTS: dict[str, tuple[str | None, str | None, str | None]] = {
    "raw": (None, None, None),
    "adaln": ("shift", "scale", None),
    "adaln+cd": ("shift", "scale", "pre"),
    "adaln+cd-post": ("shift", "scale", "post"),
    "adaln-t": ("shift_t", "scale_t", None),
    "adaln-c": ("shift_c", "scale_c", None),
}
assert set(_PAPER_VARIANTS) == set(variant_names()), "every feature variant needs its paper-precision form"


def paper_matching(config: Mapping, protocol: str) -> bool:
    """Whether a key's pairs are matched in the authors' arithmetic: keys extracted with
    ``--precision paper``, under the ``dift`` protocol of their script (other protocols match
    the same stored values in fp32)."""
    return config.get("precision") == "paper" and protocol == "dift"


def _as_tensor(value) -> torch.Tensor:
    """A tensor where it lives (a device tensor stays on its device: `np.asarray` would need a host copy)."""
    return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))


def _bf16_vector(modulation: Mapping, name: str, dim: int, device: torch.device) -> torch.Tensor:
    if name not in modulation:
        raise DitfError(f"modulation vector {name!r} is missing (have: {', '.join(sorted(modulation)) or 'none'})")
    vector = _as_tensor(modulation[name]).to(device).reshape(-1)
    if vector.numel() != dim:
        raise DitfError(f"modulation vector {name!r} has {vector.numel()} entries, the feature has {dim} channels")
    return vector.to(torch.bfloat16)


def paper_feature(
    variant: str, pre_adaln: torch.Tensor | np.ndarray, modulation: Mapping | None = None, channels: Sequence[int] = ()
) -> torch.Tensor:
    """The matching feature of one image as `eval_spair.py` computes it: (h, w, D) float16."""
    if variant not in _PAPER_VARIANTS:
        raise DitfError(f"unknown feature variant {variant!r}; known variants: {', '.join(_PAPER_VARIANTS)}")
    check_variant_applies(variant, bool(modulation))
    shift_name, scale_name, discard = _PAPER_VARIANTS[variant]
    z = _as_tensor(pre_adaln).to(torch.bfloat16)  # exact for bf16-rounded stored values
    dim = z.shape[-1]
    channels = [int(c) for c in channels] if discard else []
    if any(not 0 <= c < dim for c in channels):
        raise DitfError(f"discarded channel out of range (the feature has channels 0..{dim - 1})")
    if discard == "pre" and channels:
        z = z.clone()
        z[..., channels] = 0
    x = z
    if shift_name is not None and "norm_weight" in (modulation or {}):  # scale-only RMSNorm key: no shift
        scale = _bf16_vector(modulation, scale_name, dim, z.device)
        weight = _bf16_vector(modulation, "norm_weight", dim, z.device)
        x = F.rms_norm(z, (dim,), weight, eps=RMS_EPS) * (1 + scale)  # every step rounded to bf16
    elif shift_name is not None:
        shift = _bf16_vector(modulation or {}, shift_name, dim, z.device)
        scale = _bf16_vector(modulation or {}, scale_name, dim, z.device)
        x = (1 + scale) * F.layer_norm(z, (dim,), eps=1e-6) + shift  # every step rounded to bf16
    if discard == "post" and channels:
        x = x.clone()
        x[..., channels] = 0
    return x.to(torch.float16)


class PaperDiftMatcher:
    """The ``dift`` protocol in the authors' fp16 arithmetic (full upsampling, no shortcuts)."""

    protocol = "dift"
    threshold_rule = "<="

    @torch.inference_mode()
    def match(
        self,
        src_feat: torch.Tensor | np.ndarray,
        src_img_size: tuple[int, int],
        trg_feat: torch.Tensor | np.ndarray,
        trg_img_size: tuple[int, int],
        src_kps: np.ndarray,
        trg_key: Hashable | None = None,
    ) -> np.ndarray:
        """(N, 2) float64 predicted (x, y) in original target pixels for (N, 2) source (x, y)."""
        src, trg = _as_tensor(src_feat).to(torch.float16), _as_tensor(trg_feat).to(torch.float16)
        src = src.to(trg.device)
        (sw, sh), (tw, th) = (tuple(int(v) for v in size) for size in (src_img_size, trg_img_size))
        if min(sw, sh, tw, th) <= 0:
            raise DitfError(f"image sizes must be positive, got {src_img_size} and {trg_img_size}")
        if src.ndim != 3 or trg.ndim != 3 or src.shape[-1] != trg.shape[-1]:
            raise DitfError(f"feature maps must be (h, w, D) of one width, got {tuple(src.shape)} and {tuple(trg.shape)}")
        kps = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
        xs, ys = np.rint(kps[:, 0]).astype(np.int64), np.rint(kps[:, 1]).astype(np.int64)
        if len(xs) and ((xs < 0) | (xs >= sw) | (ys < 0) | (ys >= sh)).any():
            raise DitfError(f"a source keypoint lies outside the source image of {sw}x{sh} pixels")
        if len(xs) == 0:
            return np.zeros((0, 2))
        channels = src.shape[-1]
        src_up = F.interpolate(src.permute(2, 0, 1)[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
        trg_up = F.interpolate(trg.permute(2, 0, 1)[None], size=(th, tw), mode="bilinear", align_corners=False)[0]
        src_vecs = F.normalize(src_up[:, torch.as_tensor(ys), torch.as_tensor(xs)].T)  # (N, C): one row each, as theirs
        del src_up
        trg_vecs = F.normalize(trg_up.reshape(channels, -1).T)  # (HW, C)
        del trg_up
        cosine = torch.mm(trg_vecs, src_vecs.T)  # (HW, N) fp16
        best = cosine.float().argmax(dim=0).cpu().numpy()  # fp16 -> fp32 is exact: same first maximum
        return np.stack([best % tw, best // tw], axis=1).astype(np.float64)

    def clear_cache(self) -> None:
        """Nothing is cached (the interface of `match.DiftMatcher`)."""
