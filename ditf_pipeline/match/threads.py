"""Per-thread state of CPU matching: reusable scratch buffers and torch's intra-op thread count.

Why per thread: matchers are shared by the threads of `ditf view` and the match pool's thread
worker; buffers and the intra-op setting must not be shared between them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class ScratchBuffers(threading.local):
    """Per-thread reusable buffers (grown when too small, never shrunk)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}  # buffer name -> the tensor it holds a copy of

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
            self.copied.pop(name, None)
        return buffer[:numel]

    def copy_of(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` converted to `dtype` in buffer `name`; no copy when the buffer already holds
        this very tensor (feature maps are never changed in place; the tensor itself is kept,
        not its address: a freed tensor's memory could hold another one)."""
        buffer = self.get(name, tensor.numel(), dtype, tensor.device).view(tensor.shape)
        if self.copied.get(name) is not tensor:
            buffer.copy_(tensor)
            self.copied[name] = tensor
        return buffer


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch on one intra-op thread in the calling thread (the setting is per thread), the
    caller's setting restored at the end.

    How pairs are matched on the CPU (`predict`, `ditf view`): a pair is a few small kernels
    that gain nothing from being split over cores, and a matmul split over several threads
    sums in another order, so that a near tie of an argmax could flip between runs.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

