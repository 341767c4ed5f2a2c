"""Which torch device "auto" means, shared by every stage that runs torch.

It lives outside `models` so the match stage (DAVIS propagation on a GPU) can resolve a device
without importing the model package.
"""

from __future__ import annotations

import torch

from .core.errors import DitfError


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device when there is one, else the CPU; anything else checked first."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)  # one error line for "tpu" or a GPU this machine lacks
    return torch.device(device)


def default_dtype(device: str = "auto") -> str:
    """The dtype "auto" means on `device`: bf16 on a GPU (the authors' setting), fp32 on the CPU."""
    return "bf16" if resolve_device(device).type == "cuda" else "fp32"


def check_device(device: str) -> None:
    """`auto`, or a device torch can parse and this machine has (one error line for "tpu" or a GPU this machine lacks)."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DitfError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DitfError(f"device {device!r}: no CUDA GPU is available here; use auto or cpu")
        if parsed.index is not None and parsed.index >= count:
            raise DitfError(f"device {device!r}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    elif parsed.type not in ("cpu", "mps"):
        raise DitfError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
