"""The ensemble arithmetic: each member's noise and timestep draw, the forward, the mean.

Member m of image `key` at timestep t draws its posterior sample and noise from its own seed
(`image_seed`), so its numbers depend neither on how the ensemble is split into batches, nor on
which images share its forward, nor on the device. The means are summed member by member in
order for the same reason, then rounded as `--precision` says, and z goes to float16 storage
(`stored_features`): what the store keeps and what the in-memory path keeps are the same values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from ..core.errors import DitfError
from ..models.base import DiTAdapter, LatentPosterior, PromptEmbedding
from .settings import ExtractSettings
from .transfer import upload

__all__ = ["conditioning_variants", "ensemble_means", "image_seed", "member_draws", "stored_features"]

#: the largest finite float16: z beyond it would be stored as inf
FLOAT16_MAX = 65504


def image_seed(seed: int, key: str, timestep: int, member: int | None = None) -> int:
    """A 63-bit seed from the run seed, image key, timestep and (optionally) ensemble member."""
    text = f"{seed}:{key}:{timestep}" if member is None else f"{seed}:{key}:{timestep}:{member}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def member_draws(seed: int, key: str, timestep: int, members: range, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, noise) of ensemble `members`, each (len(members), *shape) float32 on the CPU.

    Each member has its own generator (eps first, then noise), so member m's numbers do not
    depend on how the ensemble is split into batches, nor on the device.
    """
    eps, noise = [], []
    for member in members:
        generator = torch.Generator().manual_seed(image_seed(seed, key, timestep, member))
        eps.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        noise.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(eps), torch.stack(noise)


def ensemble_means(
    adapter: DiTAdapter, settings: ExtractSettings, images: Sequence[tuple[str, LatentPosterior, PromptEmbedding]],
    timestep: int, ks: Sequence[int],
) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per image (key, posterior, prompt) of one token grid: {k: {"pre_adaln": (h, w, D), "shift": (D,), ...}},
    float32 ensemble means where the adapter runs (nothing is waited for).

    All images go through each forward together: rows = images x the members of the batch,
    image-major. Each image's members are drawn from its own seeds and summed in member
    order, so an image's numbers do not depend on which images share its forward, up to the
    last bits of the DiT's batched matrix products.
    """
    device = adapter.device
    ensemble = settings.ensemble_size
    batch = settings.batch_size or ensemble
    n = len(images)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    for start in range(0, ensemble, batch):
        members = range(start, min(start + batch, ensemble))
        rows = []
        for key, posterior, _ in images:
            eps, noise = member_draws(settings.seed, key, timestep, members, tuple(posterior.mean.shape[1:]))
            latents = posterior.sample(upload(eps, device) if posterior.std is not None else None)
            if latents.shape[0] != len(members):  # a deterministic posterior: one row for everyone
                latents = latents.expand(len(members), *latents.shape[1:])
            rows.append(adapter.add_noise(latents, upload(noise, device).to(latents.dtype), timestep))
        prompts = [prompt for _, _, prompt in images]
        noisy = rows[0] if n == 1 else torch.cat(rows)
        for k, block in adapter.forward_intermediates(noisy, prompts[0] if n == 1 else prompts, timestep, ks).items():
            parts = {"pre_adaln": block.pre_adaln}
            if block.modulation is not None:  # None: a model without AdaLN
                parts.update(block.modulation.vectors())
            into = sums.setdefault(k, {})
            for name, value in parts.items():
                value = value.float().reshape(n, len(members), *value.shape[1:])
                for member in range(len(members)):  # member order, whatever the batching
                    row = value[:, member]
                    into[name] = row.clone() if name not in into else into[name].add_(row)
    return [{k: {name: _mean(total[i], ensemble, settings.precision) for name, total in parts.items()}
             for k, parts in sums.items()}
            for i in range(n)]


def _mean(total: torch.Tensor, count: int, precision: str) -> torch.Tensor:
    """Ensemble mean in float32; `--precision paper` rounds it to bf16 as the authors'
    ``.mean(0)`` of a bf16 batch does (fp16 storage then holds those values exactly)."""
    mean = total / count
    if precision == "paper":
        mean = mean.to(torch.bfloat16).float()
    return mean


def conditioning_variants(
    adapter: DiTAdapter, prompt: PromptEmbedding, timestep: int, ks: Sequence[int], image_size: tuple[int, int]
) -> dict[int, dict[str, torch.Tensor]]:
    """{k: {"shift_t": ..., "scale_t": ..., ...}}: the t-only / c-only modulation of the conditioning
    ablation (paper Table 5), where defined (float32 tensors where the adapter runs: they go to
    the host with the features); empty for models without AdaLN."""
    out: dict[int, dict[str, torch.Tensor]] = {k: {} for k in ks}
    if not adapter.has_adaln:
        return out
    for conditioning in ("t", "c"):
        try:
            mods = adapter.modulation(prompt, timestep, ks, conditioning, image_size=image_size)
        except DitfError:
            continue  # e.g. PixArt: AdaLN sees t only, no c-only variant
        for k, mod in mods.items():
            for name, value in mod.vectors().items():
                if name != "norm_weight":  # the norm's weight is the same whatever the conditioning
                    out[k][f"{name}_{conditioning}"] = value.float()
    return out


def stored_features(key: str, timestep: int, ks: Sequence[int], host: dict[str, np.ndarray]) -> dict:
    """{k: (z as float16, modulation)} from one image's host arrays ("k/name" keys), refusing what
    float16 cannot hold: the values every sink keeps, the store and the in-memory one alike."""
    out = {}
    for k in ks:
        pre_adaln = host[f"{k}/pre_adaln"]
        if not np.isfinite(pre_adaln).all():
            raise DitfError(f"non-finite features for {key} at k={k}, t={timestep} (try --dtype fp32)")
        if np.abs(pre_adaln).max() > FLOAT16_MAX:
            raise DitfError(f"features of {key} at k={k} overflow float16 storage")
        prefix = f"{k}/"
        modulation = {name[len(prefix):]: value for name, value in host.items()
                      if name.startswith(prefix) and name != f"{k}/pre_adaln"}
        out[k] = (pre_adaln.astype(np.float16), modulation)
    return out
