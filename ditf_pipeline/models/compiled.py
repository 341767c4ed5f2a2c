"""Compiled DiT blocks that compile few graphs over a mixed-aspect run, and the count of them.

Why: a run over SPair-like images meets several token grids (aspect ratios) and several batch
sizes (a partial group of images of one grid at the end of each). With static shapes dynamo
compiles one graph per (grid, batch) and per input layout (a sliced, non-contiguous input of
the first single block, strides of the text stream), and after `torch._dynamo.config.
recompile_limit` recompiles it silently falls back to eager. `DynamicBlock` therefore

* marks the batch and token dimensions of every block input dynamic before the call
  (`torch._dynamo.maybe_mark_dynamic`: a dimension of size 1 is still specialised, so a run
  whose groups include a single image compiles 2 graphs per block kind, one otherwise);
* passes every input contiguous, so every block of a kind sees the same layout;
* counts the graphs dynamo compiles while each block kind runs (`compiled_graphs`), from
  dynamo's own counter ``counters["stats"]["unique_graphs"]``: the figure the GPU benchmark
  reports and the test bounds.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch

_lock = threading.Lock()
_graphs: Counter[str] = Counter()


def compiled_graphs() -> dict[str, int]:
    """Graphs compiled so far in this process, per block class name (e.g. ``FluxTransformerBlock``)."""
    with _lock:
        return dict(_graphs)


def reset_compiled_graphs() -> None:
    """Forget the counts (call with ``torch._dynamo.reset()`` to measure a fresh run)."""
    with _lock:
        _graphs.clear()


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _prepared(value):
    """A block input made contiguous, its batch and token dimensions marked dynamic."""
    if isinstance(value, torch.Tensor):
        value = value.contiguous()
        # (B, N, d) streams: batch and tokens; (B, d) conditioning and (N, r) rotary tables: dim 0
        for dim in range(min(value.ndim - 1, 2)):
            torch._dynamo.maybe_mark_dynamic(value, dim)
        return value
    if isinstance(value, tuple):
        return tuple(_prepared(v) for v in value)
    return value


class DynamicBlock(torch.nn.Module):
    """`block` compiled with `torch.compile(**compile_kwargs)`, its inputs prepared (see module docstring)."""

    def __init__(self, block: torch.nn.Module, **compile_kwargs) -> None:
        super().__init__()
        self.kind = type(block).__name__
        self.compiled = torch.compile(block, **compile_kwargs)

    def forward(self, *args, **kwargs):
        args = tuple(_prepared(a) for a in args)
        kwargs = {name: _prepared(value) for name, value in kwargs.items()}
        before = _unique_graphs()
        out = self.compiled(*args, **kwargs)
        new = _unique_graphs() - before
        if new:
            with _lock:
                _graphs[self.kind] += new
        return out
