"""Which torch device "auto" means, shared by every stage that runs torch.

It lives outside `models` so the match stage (DAVIS propagation on a GPU) can resolve a device
without importing the model package.
"""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device when there is one, else the CPU; anything else checked first."""
    from .validate import check_device

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)  # one error line for "tpu" or a GPU this machine lacks
    return torch.device(device)


def default_dtype(device: str = "auto") -> str:
    """The dtype "auto" means on `device`: bf16 on a GPU (the authors' setting), fp32 on the CPU."""
    return "bf16" if resolve_device(device).type == "cuda" else "fp32"
