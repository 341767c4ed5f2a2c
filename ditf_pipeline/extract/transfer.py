"""Host <-> device copies that never make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory, or ``.cpu()`` of a device
tensor, blocks the host until the GPU has finished everything queued before it: once per image
that is the GPU idling while the host decodes, draws noise and writes the store. Here every copy
goes through page-locked (pinned) memory with ``non_blocking=True``:

* `upload`: host -> device; the host queues the copy and moves on (pixels are pinned by the
  decoding threads already, so the main thread only queues).
* `HostCopies.start`: device -> host on a side stream that waits for the compute queued so far,
  so the copy of image i overlaps the forward of image i+1; `HostCopy.wait` (called by the store
  writer thread, never the main thread) blocks only until that copy is done.

On the CPU both are plain tensor handovers: no copy, nothing to wait for; the code path (writer
thread included) is the same, which is what the CPU tests exercise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` in page-locked memory when it is going to a CUDA device (else as it is)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to `device` without blocking the host (pinned source, non-blocking copy).

    The pinned staging buffer comes from PyTorch's caching host allocator, which keeps it until
    the copy has run even when the caller drops it.
    """
    if tensor.device == device:
        return tensor
    return pinned(tensor, device).to(device, non_blocking=True)


@dataclass
class HostCopy:
    """Host tensors being filled from the device; `wait` hands them over as numpy arrays."""

    tensors: dict[str, torch.Tensor]
    done: torch.cuda.Event | None = None

    def wait(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()  # the writer thread waits, the main thread keeps queueing work
        return {name: tensor.numpy() for name, tensor in self.tensors.items()}


class HostCopies:
    """Device -> host copies on a side stream of `device` (CUDA), or handovers (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = None  # made on first use: no CUDA context until then

    def start(self, tensors: dict[str, torch.Tensor]) -> HostCopy:
        """Queue the copies of `tensors` (device tensors, not modified afterwards by the caller)."""
        if self.device.type != "cuda":
            return HostCopy({name: tensor.detach().cpu() for name, tensor in tensors.items()})
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        # the side stream starts once everything queued so far on the compute stream (the
        # forward that produced these tensors) is done; compute goes on meanwhile
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self.stream):
            for name, tensor in tensors.items():
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                buffer.copy_(tensor, non_blocking=True)
                tensor.record_stream(self.stream)  # the allocator must not reuse it before the copy ran
                host[name] = buffer
        done = torch.cuda.Event()
        done.record(self.stream)
        return HostCopy(host, done)
