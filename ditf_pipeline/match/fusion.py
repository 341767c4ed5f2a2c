"""DiT features fused with DINOv2 at match time (paper: "DiTF + DINOv2", Table 2 fused rows).

The recipe is sd-dino's (Zhang et al., "A Tale of Two Features", ``pck_spair_pascal.py`` and
``utils_correspondence.co_pca``), which GeoAware-SC and the DiTF fused numbers follow:

1. **Co-PCA of the diffusion part over the pair.** The DiT tokens of the source and the target
   are stacked, centred with their joint mean, and projected on the top ``pca_dim`` principal
   directions of that stack (``torch.pca_lowrank(centered, q=pca_dim)``, then
   ``centered @ V[:, :pca_dim]``). The basis therefore depends on the *pair*: every pair gets
   its own PCA, which is why fusion is a pair-level step and not a per-image variant. The DINO
   part is not PCA'd (sd-dino's ``CO_PCA_DINO`` is 0 by default). ``torch.pca_lowrank`` is
   randomised; it runs under a fixed seed in a forked RNG, so the result is deterministic and
   the global RNG is untouched. ``pca_dim`` is clamped to min(D, tokens); 0 disables the PCA.
2. **Common grid.** The two parts live on different grids (e.g. Flux 40 x 30 at 640 px, DINOv2
   60 x 45 at 840 px); both cover the whole image, so each is resampled bilinearly
   (``align_corners=False``) to the finer of the two grids, per image (sd-dino resamples its SD
   maps to the DINO grid the same way).
3. **Normalise each part, concatenate, normalise.** GeoAware-SC's ``normalize_feats``:
   ``x / (|x| + 1e-10)`` for the diffusion part and for the DINO part separately, concatenated,
   then the whole vector again (sd-dino: each part ``x / |x|``, concatenated, L2 distance;
   the same nearest neighbours as the cosine the matchers use, since every fused vector has the
   same norm).

The result is an ordinary (h, w, pca_dim + D_dino) map per image of the pair, matched by the
usual ``dift`` or ``geoaware`` matcher. Target-side caches of the matchers are disabled for
fused pairs (the target's features depend on the source through the PCA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import DitfError
from ..core.naming import DEFAULT_PCA_DIM, fusion_label  # noqa: F401  (re-exported: results name fused variants)

#: GeoAware-SC's epsilon in ``normalize_feats``
EPS = 1e-10
#: seed of the randomised low-rank PCA (forked RNG: the global RNG is untouched)
PCA_SEED = 0


def _grid(feature, what: str) -> torch.Tensor:
    grid = torch.as_tensor(feature)
    if grid.ndim != 3:
        raise DitfError(f"{what} feature map must be (h, w, D), got shape {tuple(grid.shape)}")
    return grid.to(torch.float32)


def co_pca(src: torch.Tensor, trg: torch.Tensor, dim: int, seed: int = PCA_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-dino's ``co_pca`` for one pair of (h, w, D) maps -> (h, w, q) maps, q = min(dim, D, tokens).

    Tokens of both images are stacked, centred with the joint mean and projected on the first q
    right singular vectors ``torch.pca_lowrank`` finds (randomised, so run under `seed` in a
    forked RNG: the same pair always gives the same projection).
    """
    src, trg = _grid(src, "source"), _grid(trg, "target")
    if src.shape[-1] != trg.shape[-1]:
        raise DitfError(f"source and target features differ in width ({src.shape[-1]} vs {trg.shape[-1]})")
    (hs, ws, d), (ht, wt, _) = src.shape, trg.shape
    tokens = torch.cat([src.reshape(-1, d), trg.reshape(-1, d)])
    q = min(int(dim), d, tokens.shape[0])
    if q < 1:
        raise DitfError(f"--pca-dim must be positive, got {dim}")
    centered = tokens - tokens.mean(dim=0, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, basis = torch.pca_lowrank(centered, q=q)
    reduced = centered @ basis[:, :q]
    return reduced[: hs * ws].reshape(hs, ws, q), reduced[hs * ws :].reshape(ht, wt, q)


def resample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w, D) -> (rows, cols, D), bilinear, align_corners=False (a copy-free no-op if equal)."""
    if tuple(grid.shape[:2]) == tuple(size):
        return grid
    out = F.interpolate(grid.permute(2, 0, 1)[None], size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).contiguous()


def normalise(vectors: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """GeoAware-SC's normalisation: x / (|x| + eps) over the last axis."""
    return vectors / (torch.linalg.vector_norm(vectors, dim=-1, keepdim=True) + eps)


def common_grid(*grids: torch.Tensor) -> tuple[int, int]:
    """The finer of the grids (largest rows, largest cols) of one image's parts."""
    return max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)


def concat_parts(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Resample one image's parts to a common grid, normalise each, concatenate, normalise."""
    size = common_grid(*parts)
    fused = torch.cat([normalise(resample(part, size)) for part in parts], dim=-1)
    return normalise(fused)


def fuse_pair(
    dit_src, dit_trg, other_src, other_trg, pca_dim: int = DEFAULT_PCA_DIM, seed: int = PCA_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (h, w, q + D_other) maps of a pair: co-PCA of the DiT part, common grid, normalise, concatenate."""
    dit_src, dit_trg = _grid(dit_src, "DiT source"), _grid(dit_trg, "DiT target")
    other_src, other_trg = _grid(other_src, "fused source"), _grid(other_trg, "fused target")
    if pca_dim:
        dit_src, dit_trg = co_pca(dit_src, dit_trg, pca_dim, seed)
    return concat_parts([dit_src, other_src]), concat_parts([dit_trg, other_trg])


def parse_fuse(spec: str) -> tuple[str, int | None, int | None]:
    """``MODEL`` or ``MODEL/kK/tT`` -> (model, k, t) (k and t default to the only stored key)."""
    parts = spec.strip().split("/")
    model, k, t = parts[0], None, None
    try:
        for part in parts[1:]:
            if part.startswith("k"):
                k = int(part[1:])
            elif part.startswith("t"):
                t = int(part[1:])
            else:
                raise ValueError(part)
    except ValueError:
        raise DitfError(f"--fuse takes MODEL or MODEL/kK/tT (e.g. dinov2-b14 or dinov2-b14/k11/t0), got {spec!r}") from None
    if not model:
        raise DitfError(f"--fuse needs a model name, got {spec!r}")
    return model, k, t


@dataclass
class PairFusion:
    """The pair-level feature hook of the match driver for ``--fuse MODEL``.

    `predict.open_fusion` finds the partner's features in the same store (its own key, variant
    ``raw``) and checks every image of the pairs has them (it lives there, so this module
    imports nothing of the match driver); `bind(features)` wraps the driver's per-image
    variant cache into ``(src_key, trg_key) -> (src_map, trg_map, cache_key)``.
    """

    model: str
    k: int
    t: int
    pca_dim: int
    other: object  # predict.FeatureCache of the partner (variant raw)
    config: dict

    def describe(self) -> dict:
        return {
            "model": self.model, "k": self.k, "t": self.t, "variant": "raw", "pca_dim": self.pca_dim,
            "pca": "torch.pca_lowrank over the pair's DiT tokens, centred, seed 0" if self.pca_dim else None,
            "normalise": "each part x/(|x|+1e-10), concatenated, again x/(|x|+1e-10); common grid = finer, bilinear",
            "features": self.config,
        }

    def bind(self, features):
        """(src_key, trg_key) -> (fused src map, fused trg map, None: no per-target caching)."""

        def pair_features(src_key: str, trg_key: str):
            src, trg = fuse_pair(
                features(src_key), features(trg_key), self.other(src_key), self.other(trg_key), self.pca_dim
            )
            return src, trg, None

        return pair_features


def fused_width(dit_width: int, other_width: int, tokens: int, pca_dim: int = DEFAULT_PCA_DIM) -> int:
    """Channels of a fused map (for memory estimates and tests)."""
    return (min(pca_dim, dit_width, tokens) if pca_dim else dit_width) + other_width


__all__ = [
    "DEFAULT_PCA_DIM", "PairFusion", "co_pca", "common_grid", "concat_parts", "fuse_pair", "fused_width",
    "fusion_label", "normalise", "parse_fuse", "resample",
]
