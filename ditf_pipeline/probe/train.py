"""Training the probe's head: streamed batches in a seeded order, AdamW, mmseg's schedule, checkpoints.

Each step reads `batch_size` images (features + label) from the store in an order shuffled per
epoch (seeded by (seed, epoch), so the order never has to be stored); a small thread pool reads
ahead, so nothing holds more than a few images in memory. The logits are trained with
cross-entropy at label size, ignore index 255. Optimiser: AdamW, linear warmup then poly
(power 1) decay to 0, as mmseg's schedule. Resuming from a checkpoint reproduces an
uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DitfError
from ..datasets.base import Dataset
from .checkpoint import load_checkpoint, save_checkpoint
from .data import FeatureSource, num_classes, read_ahead, resize_label
from .head import LinearHead

__all__ = ["ProbeSettings", "epoch_order", "learning_rate", "torch_device", "train_probe"]


@dataclass
class ProbeSettings:
    """Everything that changes the trained head (must match to resume a checkpoint)."""

    variant: str = "adaln"
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16  # images per step
    warmup_steps: int | None = None  # None: min(1500, 5% of all steps)
    seed: int = 0
    train_label_side: int | None = None  # None: loss at full label size; N: labels nearest-resized to long side <= N


def _schedule(n_images: int, settings: ProbeSettings) -> tuple[int, int]:
    steps_per_epoch = math.ceil(n_images / settings.batch_size)
    return steps_per_epoch, steps_per_epoch * settings.epochs


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The image order of one epoch: a permutation seeded by (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _batches(keys: Sequence[str], settings: ProbeSettings, start: int, stop: int) -> Iterator[tuple[int, list[str]]]:
    steps_per_epoch, _ = _schedule(len(keys), settings)
    order, order_epoch = None, -1
    for step in range(start, stop):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(settings.seed, epoch, len(keys)), epoch
        chosen = order[index * settings.batch_size : (index + 1) * settings.batch_size]
        yield step, [keys[i] for i in chosen]


def learning_rate(step: int, total: int, settings: ProbeSettings) -> float:
    """Linear warmup (from lr * 1e-6) then poly decay with power 1 to 0, as mmseg's 'poly'."""
    warmup = settings.warmup_steps if settings.warmup_steps is not None else min(1500, total // 20)
    if step < warmup:
        return settings.lr * (1e-6 + (1 - 1e-6) * step / warmup)
    return settings.lr * (1 - step / max(total, 1))


def torch_device(name: str) -> torch.device:
    """The device a probe runs on ("auto": CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise DitfError(f"unknown device {name!r}") from exc


def _identity(source: FeatureSource, train: Dataset, keys: Sequence[str], settings: ProbeSettings) -> dict:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return {
        "feature_key": source.arrays.path,
        "feature_config": source.arrays.config,
        "train_split": train.split,
        "train_images": len(keys),
        "train_keys_sha256": digest,
        **asdict(settings),
    }


def train_probe(
    source: FeatureSource,
    train: Dataset,
    settings: ProbeSettings,
    out_dir: Path,
    resume: bool = True,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    stop_after: int | None = None,
    checkpoint_every: int = 200,
) -> tuple[LinearHead, dict]:
    """Train (or resume) the head on `source`'s features of the `train` split.

    `stop_after` ends the run after that many steps in total (a checkpoint is written), as an
    interruption would; the next call with `resume` continues from there. Returns the head (on
    the CPU, eval mode) and {"steps", "total_steps", "resumed_from", "finished"}.
    """
    from ..core.progress import progress as progress_display

    classes, ignore_index, _ = num_classes(train)
    if settings.epochs < 1 or settings.batch_size < 1 or settings.lr <= 0:
        raise DitfError("--epochs and --batch-size must be at least 1 and --lr positive")
    keys = [record.key for record in train.images()]
    source.check(keys, train.split, train.name)
    steps_per_epoch, total = _schedule(len(keys), settings)
    dev = torch_device(device)
    torch.manual_seed(settings.seed)
    head = LinearHead(source.hidden_size, classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    identity = _identity(source, train, keys, settings)
    folder = Path(out_dir) / "checkpoint"
    start, resumed_from = 0, None
    if resume:
        loaded = load_checkpoint(folder, head, optimizer, identity)
        if loaded is not None:
            start = resumed_from = loaded[0]
    head.to(dev)
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and name != "step":
                state[name] = value.to(dev)
    stop = total if stop_after is None else min(total, max(start, stop_after))

    def load(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        labels = resize_label(train.load_label(key), settings.train_label_side)
        return source.feature(key, settings.variant), torch.from_numpy(labels.astype(np.int64))

    schedule = list(_batches(keys, settings, start, stop))
    flat = [key for _, batch in schedule for key in batch]
    loaded_items = read_ahead(flat, load, workers, lookahead=2 * settings.batch_size)
    bar = progress_display(total, f"probe {settings.variant}", "step", enabled=progress, initial=start)
    head.train()
    for step, batch in schedule:
        items = [next(loaded_items) for _ in batch]
        features = [f.to(dev) for f, _ in items]
        labels = [lab.to(dev) for _, lab in items]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, settings)
        logits = head.logit_maps(features, [tuple(lab.shape) for lab in labels])
        loss_sum = sum(F.cross_entropy(lg[None], lab[None], ignore_index=ignore_index, reduction="sum")
                       for lg, lab in zip(logits, labels))
        count = sum(int((lab != ignore_index).sum()) for lab in labels)
        loss = loss_sum / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", epoch=step // steps_per_epoch)
        done = step + 1
        if done == stop or done % checkpoint_every == 0 or done % steps_per_epoch == 0:
            save_checkpoint(folder, head, optimizer, done, done // steps_per_epoch, identity)
    bar.close()
    head.to("cpu").eval()
    return head, {"steps": stop, "total_steps": total, "resumed_from": resumed_from, "finished": stop == total}
