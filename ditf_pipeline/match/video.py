"""Semi-supervised video object segmentation by label propagation (DAVIS-2017).

The algorithm of DINO's ``eval_video_segmentation.py`` (facebookresearch/dino), which DiTF's
``eval_davis.py`` (ganchaofan0000/DiTF) copies with a temperature argument, a /32 frame size
and a 16x feature stride:

1. the first annotation is resized with nearest neighbour to the feature grid (cols x rows)
   and one-hot encoded: C = max label + 1 channels (background = channel 0);
2. for every later frame t the context is [first frame] + the last `n_last` frames (their
   features and their *soft* propagated masks, at feature resolution);
3. affinity of every context position (source) to every target position (query):
   ``exp(cos(f_src, f_tar) / temperature)``, zeroed outside the local window
   ``|dy| <= radius and |dx| <= radius`` (in feature cells; radius <= 0 disables the window,
   as DINO's ``size_mask_neighborhood = 0`` does);
4. per target position keep the `topk` largest affinities over ALL context frames together
   (values >= the k-th largest survive, so ties are kept), normalise them to sum 1 and
   average the context masks with these weights -> soft mask (C, rows, cols), pushed into the
   queue;
5. output: bilinear upsampling by `upsample_factor` (align_corners=False), per-channel
   min-max normalisation (channels whose maximum is <= 0 are left as they are), argmax,
   nearest-neighbour resize to the original frame size, indexed PNG with the first
   annotation's palette. The first frame's PNG is the first annotation itself.

The affinity is computed tile by tile (target tiles of `tile` x `tile` cells against the
source cells within `radius` of the tile), which gives exactly the values of DINO's dense
(n*h*w) x (h*w) matrix inside the window and needs ~(tile + 2 radius)^2 / (2 radius + 1)^2
of the work of the dense product restricted to the window, never the dense matrix itself.

Output folders are never reused: `propagate_davis` refuses a non-empty output folder unless
``overwrite=True``, in which case it deletes the previous run (only a folder holding this
module's run marker), writes each sequence into a temporary folder that is renamed into place
when the sequence is complete, and marks the run complete at the very end. The scorer refuses a
folder whose marker does not say complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..datasets.davis import VOID_LABEL, VideoSequence, read_mask, write_mask
from ..core.errors import DitfError
from ..core.naming import RUN_MARKER

FeatureSource = Callable[[int], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class PropagationSettings:
    """DINO / DiTF defaults: T=0.1, top-5, 7 preceding frames, window radius 12 cells."""

    temperature: float = 0.1
    topk: int = 5
    n_last: int = 7
    radius: int = 12
    #: model-input pixels per feature cell: the soft mask is upsampled by this factor before
    #: the argmax, then resized (nearest) to the original frame (DiTF: 16 for Flux)
    upsample_factor: int = 16
    #: target tile side (cells) of the windowed affinity; changes speed, not results
    tile: int = 16

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise DitfError(f"propagation temperature must be > 0, got {self.temperature}")
        for name in ("topk", "upsample_factor", "tile"):
            if int(getattr(self, name)) < 1:
                raise DitfError(f"propagation {name} must be >= 1, got {getattr(self, name)}")
        if self.n_last < 0:
            raise DitfError(f"propagation n_last must be >= 0, got {self.n_last}")


def _as_grid(feature, what: str, device: torch.device) -> torch.Tensor:
    grid = torch.as_tensor(np.asarray(feature) if not isinstance(feature, torch.Tensor) else feature)
    if grid.ndim != 3 or min(grid.shape) < 1:
        raise DitfError(f"{what}: features must be (rows, cols, D), got shape {tuple(grid.shape)}")
    grid = grid.to(device=device, dtype=torch.float32)
    if not torch.isfinite(grid).all():
        raise DitfError(f"{what}: features contain NaN or inf")
    return F.normalize(grid, dim=-1, p=2)  # DINO normalises along the feature dimension


def one_hot_labels(labels: np.ndarray, n_channels: int) -> torch.Tensor:
    """(h, w) labels -> (C, h, w) float32 one-hot (DINO's ``to_one_hot``)."""
    t = torch.as_tensor(labels.astype(np.int64))
    return F.one_hot(t, n_channels).permute(2, 0, 1).to(torch.float32)


def downsample_labels(labels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map to the feature grid, with PIL as DINO does."""
    img = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(img.resize((cols, rows), Image.Resampling.NEAREST))


def propagate_step(
    target: torch.Tensor,
    sources: Sequence[torch.Tensor],
    source_masks: Sequence[torch.Tensor],
    settings: PropagationSettings,
) -> torch.Tensor:
    """One propagation step: L2-normalised (h, w, D) features -> soft mask (C, h, w).

    `sources[i]` (h, w, D) carries the soft / one-hot mask `source_masks[i]` (C, h, w).
    """
    h, w, dim = target.shape
    n = len(sources)
    if n == 0 or n != len(source_masks):
        raise DitfError("propagate_step needs as many source masks as source features (at least one)")
    src = torch.stack(list(sources))  # n, h, w, D
    masks = torch.stack(list(source_masks)).permute(0, 2, 3, 1)  # n, h, w, C
    channels = masks.shape[-1]
    radius = settings.radius if settings.radius > 0 else max(h, w)
    tile = settings.tile
    rows = torch.arange(h, device=target.device)
    cols = torch.arange(w, device=target.device)
    out = torch.empty(h, w, channels, dtype=torch.float32, device=target.device)
    for r0 in range(0, h, tile):
        r1 = min(h, r0 + tile)
        b0, b1 = max(0, r0 - radius), min(h, r1 + radius)
        for c0 in range(0, w, tile):
            c1 = min(w, c0 + tile)
            d0, d1 = max(0, c0 - radius), min(w, c1 + radius)
            query = target[r0:r1, c0:c1].reshape(-1, dim)  # m, D
            keys = src[:, b0:b1, d0:d1].reshape(-1, dim)  # N, D (context-major, then row, col)
            values = masks[:, b0:b1, d0:d1].reshape(-1, channels)  # N, C
            aff = (query @ keys.T).div_(settings.temperature).exp_()  # m, N
            # window: |dy| <= radius and |dx| <= radius (DINO: aff *= mask_neighborhood)
            rows_ok = (rows[r0:r1, None] - rows[None, b0:b1]).abs() <= radius  # tr, bh
            cols_ok = (cols[c0:c1, None] - cols[None, d0:d1]).abs() <= radius  # tc, bw
            outside = ~(rows_ok[:, None, :, None] & cols_ok[None, :, None, :]).reshape(len(query), 1, -1)
            aff.view(len(query), n, -1).masked_fill_(outside, 0.0)
            k = min(settings.topk, aff.shape[1])
            kth = torch.topk(aff, k=k, dim=1).values[:, -1:]  # k-th largest; ties with it survive
            aff.masked_fill_(aff < kth, 0.0)
            aff.div_(aff.sum(dim=1, keepdim=True))
            out[r0:r1, c0:c1] = (aff @ values).reshape(r1 - r0, c1 - c0, channels)
    return out.permute(2, 0, 1).contiguous()


def norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """DINO's per-channel min-max normalisation of a (C, H, W) soft mask (in place, returned).

    A channel whose maximum is <= 0 is left unchanged. A positive constant channel, where DINO
    divides 0 by 0 and gets NaN (which then wins the argmax), becomes all ones instead.
    """
    for c in range(mask.shape[0]):
        channel = mask[c]
        if channel.max() > 0:
            shifted = channel - channel.min()
            top = shifted.max()
            mask[c] = shifted / top if top > 0 else torch.ones_like(channel)
    return mask


def soft_to_labels(soft: torch.Tensor, upsample_factor: int, out_size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) soft mask -> (H, W) uint8 labels at `out_size` = (width, height)."""
    up = F.interpolate(
        soft[None],
        scale_factor=upsample_factor,
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )[0]
    up = norm_mask(up)
    labels = torch.argmax(up, dim=0).to("cpu").numpy().astype(np.uint8)
    return np.asarray(Image.fromarray(labels).resize(out_size, Image.Resampling.NEAREST))


def propagate_sequence(
    features: FeatureSource,
    first_mask: np.ndarray,
    frame_names: Sequence[str],
    out_dir: Path | str,
    palette: np.ndarray,
    settings: PropagationSettings = PropagationSettings(),
    device: str | torch.device = "cpu",
    frame_size: tuple[int, int] | None = None,
) -> list[Path]:
    """Propagate `first_mask` through a video and write ``<out_dir>/<frame name>.png`` for all.

    `features(i)` returns the (rows, cols, D) feature of frame i (already the chosen variant);
    frames are requested in order 0, 1, ..., each once, so they can stream from the store.
    `first_mask` is the first annotation (H, W) as labels (255 = void is read as background);
    `frame_size` = (W, H) of the output, default the first annotation's size. Every frame,
    the first included, is (over)written. Returns the written paths.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first_mask = np.asarray(first_mask)
    if first_mask.ndim != 2:
        raise DitfError(f"first mask must be a 2-D label map, got shape {first_mask.shape}")
    labels0 = np.where(first_mask == VOID_LABEL, 0, first_mask).astype(np.uint8)
    n_channels = int(labels0.max()) + 1
    out_size = frame_size or (first_mask.shape[1], first_mask.shape[0])
    if not frame_names:
        raise DitfError("propagate_sequence: no frames")

    paths = [out_dir / f"{name}.png" for name in frame_names]
    write_mask(paths[0], first_mask, palette)  # DINO saves the original first annotation
    first = _as_grid(features(0), f"frame {frame_names[0]}", device)
    rows, cols, _ = first.shape
    seed = one_hot_labels(downsample_labels(labels0, rows, cols), n_channels).to(device)
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last or None)
    with torch.no_grad():
        for i in range(1, len(frame_names)):
            target = _as_grid(features(i), f"frame {frame_names[i]}", device)
            if target.shape != first.shape:
                raise DitfError(
                    f"frame {frame_names[i]}: feature grid {tuple(target.shape)} differs from the first "
                    f"frame's {tuple(first.shape)}"
                )
            context = [(first, seed)] + list(queue)
            soft = propagate_step(target, [c[0] for c in context], [c[1] for c in context], settings)
            if settings.n_last > 0:
                queue.append((target, soft))
            write_mask(
                paths[i],
                soft_to_labels(soft, settings.upsample_factor, out_size),
                palette,
            )
    return paths


def _prepare_output(out_root: Path, overwrite: bool) -> None:
    if out_root.exists() and not out_root.is_dir():
        raise DitfError(f"propagation output {out_root} exists and is not a folder")
    if out_root.is_dir() and any(out_root.iterdir()):
        if not overwrite:
            raise DitfError(
                f"propagation output {out_root} is not empty; pick a new folder or overwrite (old results "
                f"are never reused)"
            )
        if not (out_root / RUN_MARKER).is_file():
            raise DitfError(
                f"refusing to overwrite {out_root}: it has no {RUN_MARKER}, so it was not written by a "
                f"propagation run; delete it yourself or pick another folder"
            )
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True, exist_ok=True)


def _write_marker(out_root: Path, info: dict) -> None:
    tmp = out_root / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out_root / RUN_MARKER)


def propagate_davis(
    sequences: Sequence[VideoSequence],
    features_for_key: Callable[[str], torch.Tensor | np.ndarray],
    out_root: Path | str,
    settings: PropagationSettings = PropagationSettings(),
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    run_info: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Propagate every sequence into ``<out_root>/<seq>/<frame>.png`` (davis2017-evaluation layout).

    `features_for_key(image key)` returns the (rows, cols, D) feature of one frame. The folder
    is fresh for every run (see the module docstring); `run_info` (model, k, t, variant, ...)
    is recorded in the run marker with the settings. `progress(seq, done, total)` is called
    after each sequence.
    """
    out_root = Path(out_root)
    _prepare_output(out_root, overwrite)
    info = {
        "status": "running",
        "settings": asdict(settings),
        "run": run_info or {},
        "sequences": [s.name for s in sequences],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_marker(out_root, info)
    for done, seq in enumerate(sequences, 1):
        first_mask, palette = read_mask(seq.first_mask, with_palette=True)
        partial = out_root / f".{seq.name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        keys = [record.key for record in seq.frames]
        propagate_sequence(
            lambda i, keys=keys: features_for_key(keys[i]),
            first_mask,
            seq.frame_names,
            partial,
            palette,
            settings=settings,
            device=device,
        )
        os.replace(partial, out_root / seq.name)
        if progress is not None:
            progress(seq.name, done, len(sequences))
    info["status"] = "complete"
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_marker(out_root, info)
    return out_root
