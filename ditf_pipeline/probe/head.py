"""The probe's head (DINOv2's linear evaluation) and its saved form: safetensors + JSON, no pickle.

BatchNorm over the channels + a 1x1 linear layer, applied to every token; the (C, h, w) logits
are upsampled bilinearly (align_corners=False) to the size of the label map. The saved weights
are those of ``BatchNorm2d(D)`` + ``Conv2d(D, C, 1)`` (the linear weight is the conv weight
without its 1x1 axes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..core.errors import DitfError
from .files import atomic_write_bytes

__all__ = ["HEAD_FORMAT", "LinearHead", "load_head", "save_head"]

HEAD_FORMAT = "ditf-probe-head/1"


class LinearHead(torch.nn.Module):
    """BatchNorm over channels + linear classifier on tokens (= BatchNorm2d + 1x1 conv)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(in_channels)
        self.linear = torch.nn.Linear(in_channels, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(tokens))

    def logit_maps(self, features: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """(C, H, W) logits for each (h, w, D) feature map, bilinearly upsampled to its (H, W).

        All maps' tokens go through the BatchNorm together (batch statistics in training mode).
        """
        tokens = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        logits = self(tokens)
        out, start = [], 0
        for feature, size in zip(features, sizes):
            h, w = feature.shape[:2]
            grid = logits[start : start + h * w].reshape(h, w, -1).permute(2, 0, 1)[None]
            start += h * w
            out.append(F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0])
        return out


def save_head(head: LinearHead, out_dir: Path, config: dict) -> Path:
    """``head.safetensors`` (bn.*, linear.*) + ``head.json`` (config and results) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "head.safetensors"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": HEAD_FORMAT})
    os.replace(tmp, path)
    atomic_write_bytes(out_dir / "head.json", json.dumps(config, indent=1).encode())
    return path


def load_head(out_dir: Path) -> tuple[LinearHead, dict]:
    """A saved head and its config (safetensors + JSON; nothing is unpickled)."""
    out_dir = Path(out_dir)
    try:
        config = json.loads((out_dir / "head.json").read_text(encoding="utf-8"))
        tensors = load_file(str(out_dir / "head.safetensors"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitfError(f"cannot read probe head in {out_dir}: {exc}") from exc
    head = LinearHead(int(config["in_channels"]), int(config["num_classes"]))
    head.load_state_dict(tensors, strict=True)
    return head.eval(), config
