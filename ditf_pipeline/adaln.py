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
