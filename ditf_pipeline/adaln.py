"""The AdaLN arithmetic every DiT block applies, shared by the model adapters and the match stage.

A foundation module (torch only, no stage imports): the adapters use it to compute block outputs
and the match stage to compute feature variants from cached vectors, and neither may import
the other.
"""

from __future__ import annotations

import torch


def layer_norm(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The affine-free LayerNorm every DiT block applies before its AdaLN modulation."""
    return torch.nn.functional.layer_norm(z, z.shape[-1:], eps=eps)


def modulate(z: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1 + scale) * LayerNorm(z) + shift for z (B, ..., D) and per-sample vectors (B, D)."""
    view = (shift.shape[0],) + (1,) * (z.ndim - 2) + (shift.shape[-1],)
    return layer_norm(z, eps) * (1 + scale.reshape(view)) + shift.reshape(view)


#: the eps of the scale-only RMSNorm families' MLP-side norm (Lumina-Image 2.0, Z-Image; their
#: adapters refuse checkpoints with another, since the match stage applies this one)
RMS_EPS = 1e-5


def rms_norm(z: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """diffusers' `RMSNorm` with a learned weight, float32: z * rsqrt(mean(z^2) + eps) * weight."""
    z = z.to(torch.float32)
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * weight
