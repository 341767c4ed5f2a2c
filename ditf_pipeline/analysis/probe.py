"""Linear-probe semantic segmentation from cached features (paper Table 6: ADE20K, mIoU).

The DiT never runs here: features come from the store, one image at a time, as the variant
(``raw``, ``adaln``, ``adaln-t``, ``adaln-c``; no channel discard for this task) computed from
the cached pre-AdaLN stream and AdaLN vectors.

Head (DINOv2's linear evaluation): BatchNorm over the channels + a 1x1 linear layer, applied to
every token; the (C, h, w) logits are upsampled bilinearly (align_corners=False) to the size of
the label map and trained with cross-entropy, ignore index 255. The saved weights are those of
``BatchNorm2d(D)`` + ``Conv2d(D, C, 1)`` (the linear weight is the conv weight without its 1x1
axes). Optimiser: AdamW, linear warmup then poly (power 1) decay to 0, as mmseg's schedule.

Streaming: each step reads `batch_size` images (features + label) from the store in an order
shuffled per epoch (seeded by (seed, epoch), so the order never has to be stored); a small
thread pool reads ahead. Nothing holds more than a few images in memory.

Scales: one store per image scale. The same dataset extracted with several ``--img-size`` into
several stores (same model, k, t; configs differing only in ``img_size``) gives several scales;
the head is trained on the first store and evaluated on each scale, and the multi-scale
prediction averages the per-scale softmax probabilities after upsampling to the label size
(mmseg's ``aug_test``; ``ms_average="logits"`` averages logits instead).

Checkpoints (``<out>/checkpoint/``): ``state-<step>.safetensors`` (head + AdamW tensors) and
``state.json`` (step, epoch, settings, RNG state as plain ints, SHA-256 of the tensor file),
written tensor file first, JSON last, both by atomic rename; no pickle anywhere. Resuming
reproduces an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..datasets.base import Dataset
from ..core.errors import DitfError
from ..match.features import compute_feature
from ..store.feature_store import FeatureArrays, FeatureStore, config_differences, local_beside

#: variant -> the modulation vectors it needs (channel discard is not used for segmentation)
PROBE_VARIANTS: dict[str, tuple[str, ...]] = {
    "raw": (),
    "adaln": ("shift", "scale"),
    "adaln-t": ("shift_t", "scale_t"),
    "adaln-c": ("shift_c", "scale_c"),
}
HEAD_FORMAT = "ditf-probe-head/1"
CHECKPOINT_FORMAT = "ditf-probe-checkpoint/1"


# ---- metrics ------------------------------------------------------------------------------------
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth is `ignore_index` (or outside 0..num_classes-1) are skipped.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise DitfError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if np.any((pred[valid] < 0) | (pred[valid] >= num_classes)):
        raise DitfError(f"prediction holds classes outside 0..{num_classes - 1}")
    counts = np.bincount(gt[valid] * num_classes + pred[valid], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> dict:
    """Per-class IoU (NaN for a class absent from both ground truth and prediction), mIoU
    (mean over the other classes, as mmseg), per-class accuracy and overall pixel accuracy."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    gt_count = cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "iou": iou,
        "acc": acc,
        "macc": float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan"),
        "aacc": float(tp.sum() / total) if total > 0 else float("nan"),
    }


# ---- the head -------------------------------------------------------------------------------------
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


# ---- settings / report ----------------------------------------------------------------------------
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


@dataclass
class ProbeReport:
    out_dir: str
    head: str
    key: str
    variant: str
    scales: list
    steps: int
    total_steps: int
    resumed_from: int | None
    seconds: float
    finished: bool
    single_scale: dict | None = None
    multi_scale: dict | None = None
    class_names: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# ---- sources --------------------------------------------------------------------------------------
@dataclass
class FeatureSource:
    """One store's features of (dataset, model, k, t) at one image scale."""

    store: FeatureStore
    arrays: FeatureArrays
    rows: dict[str, int]

    @property
    def scale(self):
        return self.arrays.config.get("img_size")

    @property
    def hidden_size(self) -> int:
        return self.arrays.hidden_size

    def feature(self, key: str, variant: str) -> torch.Tensor:
        pre_adaln, modulation = self.arrays.read_image(self.rows[key])
        return compute_feature(variant, pre_adaln, modulation)

    def check(self, keys: Sequence[str], split: str, dataset: str) -> None:
        complete = self.arrays.complete()
        missing = [k for k in keys if k not in self.rows or self.rows[k] >= len(complete) or not complete[self.rows[k]]]
        if missing:
            raise DitfError(
                f"store {self.store.path} has no features for {len(missing)} of {len(keys)} {dataset} {split} "
                f"images in {self.arrays.path} (first: {missing[0]}): run `ditf extract --dataset {dataset} "
                f"--split {split} --store {self.store.path}` with the same model, k, t"
            )


def check_variant(arrays: FeatureArrays, variant: str) -> None:
    if variant not in PROBE_VARIANTS:
        extra = " (channel discard is not used for segmentation)" if "+cd" in variant else ""
        raise DitfError(f"unknown probe variant {variant!r}{extra}; choose one of {', '.join(PROBE_VARIANTS)}")
    have = set(arrays.modulation_names)
    missing = [name for name in PROBE_VARIANTS[variant] if name not in have]
    if missing:
        raise DitfError(
            f"{arrays.path} holds no {', '.join(missing)} modulation vectors (a model without AdaLN, or "
            f"not extracted): variant {variant!r} needs them; use --variant raw"
        )


def open_sources(
    stores: Sequence[FeatureStore], dataset: str, model: str, k: int, t: int, variant: str
) -> list[FeatureSource]:
    """The same (dataset, model, k, t) in every store, one scale each; configs may differ in img_size only."""
    if not stores:
        raise DitfError("no --store given")
    sources = []
    for store in stores:
        arrays = store.open_features(dataset, model, k, t)
        check_variant(arrays, variant)
        sources.append(FeatureSource(store, arrays, store.image_rows(dataset)))
    first = sources[0]
    for source in sources[1:]:
        a = {key: v for key, v in first.arrays.config.items() if key != "img_size"}
        b = {key: v for key, v in source.arrays.config.items() if key != "img_size"}
        differences = config_differences(a, b)
        if differences:
            raise DitfError(
                f"stores {first.store.path} and {source.store.path} hold {first.arrays.path} with different settings "
                f"besides img_size ({'; '.join(differences)}): scales must differ in img_size only"
            )
        if source.hidden_size != first.hidden_size:
            raise DitfError(f"stores {first.store.path} and {source.store.path} hold features of different widths")
    scales = [s.scale for s in sources]
    if len(set(map(str, scales))) != len(scales):
        raise DitfError(f"two --store hold the same image scale (img_size {scales}): give one store per scale")
    return sources


# ---- streaming ----------------------------------------------------------------------------------
def _read_ahead(items: Iterable, load: Callable, workers: int, lookahead: int) -> Iterator:
    """`load(item)` for each item, in order, computed by a thread pool `lookahead` items ahead."""
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque(pool.submit(load, item) for _, item in zip(range(max(1, lookahead)), iterator))
        while pending:
            future = pending.popleft()
            for item in iterator:
                pending.append(pool.submit(load, item))
                break
            yield future.result()


def _resize_label(labels: np.ndarray, max_side: int | None) -> np.ndarray:
    from PIL import Image

    h, w = labels.shape
    if not max_side or max(h, w) <= max_side:
        return labels
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(labels, "L").resize(size, Image.Resampling.NEAREST))


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


# ---- checkpoints --------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_tensors(head: LinearHead, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"head/{name}": value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"opt/{index}/{name}"] = value.detach().cpu().contiguous()
    return tensors


def _torch_rng() -> list[int]:
    return [int(v) for v in torch.get_rng_state().tolist()]


def save_checkpoint(folder: Path, head: LinearHead, optimizer, step: int, epoch: int, identity: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensor_path = folder / f"state-{step:09d}.safetensors"
    tmp = tensor_path.with_name(f".{tensor_path.name}.tmp{os.getpid()}")
    save_file(_state_tensors(head, optimizer), str(tmp), metadata={"format": CHECKPOINT_FORMAT, "step": str(step)})
    os.replace(tmp, tensor_path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": epoch,
        "tensors": tensor_path.name,
        "sha256": _sha256(tensor_path),
        "identity": identity,
        "rng": {"torch_cpu": _torch_rng(), "order": "numpy default_rng([seed, epoch]).permutation (stateless)"},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write_bytes(folder / "state.json", json.dumps(state, indent=1).encode())
    for old in folder.glob("state-*.safetensors"):
        if old.name != tensor_path.name:
            old.unlink(missing_ok=True)
    return folder / "state.json"


def load_checkpoint(folder: Path, head: LinearHead, optimizer, identity: dict) -> tuple[int, int] | None:
    """Restore head, optimiser and RNG from `folder`; (step, epoch), or None when there is none."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DitfError(f"checkpoint {state_path} is not valid JSON ({exc}): pass --no-resume to start over") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DitfError(f"checkpoint {state_path} is not a ditf probe checkpoint: pass --no-resume to start over")
    differences = config_differences(state.get("identity", {}), json.loads(json.dumps(identity)))
    if differences:
        raise DitfError(
            f"checkpoint {state_path} was written with other settings ({'; '.join(differences)}): "
            "pass --no-resume to start over, or another --out"
        )
    name = state.get("tensors")
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.startswith("state-"):
        raise DitfError(f"checkpoint {state_path}: field 'tensors' must name a state-*.safetensors file, got {name!r}")
    tensor_path = folder / name
    if not tensor_path.is_file() or _sha256(tensor_path) != state.get("sha256"):
        raise DitfError(f"checkpoint {tensor_path} is missing or does not match {state_path}: pass --no-resume")
    step, epoch = state.get("step"), state.get("epoch")
    if not isinstance(step, int) or not isinstance(epoch, int) or step < 0:
        raise DitfError(f"checkpoint {state_path}: 'step' and 'epoch' must be non-negative integers")
    tensors = load_file(str(tensor_path))
    head_state = {name[5:]: value for name, value in tensors.items() if name.startswith("head/")}
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        raise DitfError(f"checkpoint {tensor_path} does not fit this head: {exc}") from exc
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt/"):
            _, index, key = name.split("/", 2)
            opt_state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    rng = state.get("rng", {}).get("torch_cpu")
    if isinstance(rng, list) and rng:
        torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
    return step, epoch


# ---- training / evaluation --------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise DitfError(f"unknown device {name!r}") from exc


def _num_classes(dataset: Dataset) -> tuple[int, int, list[str]]:
    num_classes = getattr(dataset, "num_classes", None)
    if dataset.task != "segmentation" or not hasattr(dataset, "load_label") or not num_classes:
        raise DitfError(f"dataset {dataset.name!r} is not a semantic segmentation benchmark (task {dataset.task!r})")
    names = list(getattr(dataset, "class_names", [str(i) for i in range(num_classes)]))
    return int(num_classes), int(getattr(dataset, "ignore_index", 255)), names


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

    num_classes, ignore_index, _ = _num_classes(train)
    if settings.epochs < 1 or settings.batch_size < 1 or settings.lr <= 0:
        raise DitfError("--epochs and --batch-size must be at least 1 and --lr positive")
    keys = [record.key for record in train.images()]
    source.check(keys, train.split, train.name)
    steps_per_epoch, total = _schedule(len(keys), settings)
    dev = _device(device)
    torch.manual_seed(settings.seed)
    head = LinearHead(source.hidden_size, num_classes)
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
        labels = _resize_label(train.load_label(key), settings.train_label_side)
        return source.feature(key, settings.variant), torch.from_numpy(labels.astype(np.int64))

    schedule = list(_batches(keys, settings, start, stop))
    flat = [key for _, batch in schedule for key in batch]
    loaded_items = _read_ahead(flat, load, workers, lookahead=2 * settings.batch_size)
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


def evaluate_probe(
    head: LinearHead,
    sources: Sequence[FeatureSource],
    val: Dataset,
    variant: str,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    ms_average: str = "softmax",
) -> dict:
    """Confusion matrices on `val`: single scale (first source) and, with several sources,
    multi-scale (per-scale softmax probabilities, or logits, averaged at label size)."""
    from ..core.progress import progress as progress_display

    if ms_average not in ("softmax", "logits"):
        raise DitfError(f"ms_average must be 'softmax' or 'logits', got {ms_average!r}")
    num_classes, ignore_index, names = _num_classes(val)
    keys = [record.key for record in val.images()]
    for source in sources:
        source.check(keys, val.split, val.name)
    dev = _device(device)
    head = head.to(dev).eval()

    def load(key: str):
        return [source.feature(key, variant) for source in sources], val.load_label(key)

    single = np.zeros((num_classes, num_classes), dtype=np.int64)
    multi = np.zeros_like(single)
    items = _read_ahead(keys, load, workers, lookahead=4)
    with torch.no_grad():
        bar = progress_display(len(keys), "probe eval", "img", enabled=progress)
        for features, labels in items:
            size = labels.shape
            total = None
            for i, feature in enumerate(features):
                logits = head.logit_maps([feature.to(dev)], [size])[0]
                if i == 0:
                    single += confusion_matrix(logits.argmax(0).cpu().numpy(), labels, num_classes, ignore_index)
                if len(features) > 1:
                    part = logits.softmax(0) if ms_average == "softmax" else logits
                    total = part if total is None else total + part
            if total is not None:
                multi += confusion_matrix(total.argmax(0).cpu().numpy(), labels, num_classes, ignore_index)
            bar.update(1)
        bar.close()
    head.to("cpu")
    out = {"single_scale": _summary(single, names), "multi_scale": None}
    if len(sources) > 1:
        out["multi_scale"] = _summary(multi, names)
    return out


def _summary(cm: np.ndarray, names: Sequence[str]) -> dict:
    metrics = iou_from_confusion(cm)

    def plain(values):  # percent, full precision (rounding is for display only)
        return [None if np.isnan(v) else 100.0 * float(v) for v in values]

    return {
        "miou": 100.0 * metrics["miou"],
        "macc": 100.0 * metrics["macc"],
        "aacc": 100.0 * metrics["aacc"],
        "per_class_iou": dict(zip(names, plain(metrics["iou"]))),
        "per_class_acc": dict(zip(names, plain(metrics["acc"]))),
        "pixels": int(cm.sum()),
    }


def default_out_dir(store: str | Path, dataset: str, model: str, k: int, t: int, variant: str) -> Path:
    """``<store>.probe/<dataset>-<model>-k<k>-t<t>-<variant>`` next to the (first) store.

    An object store has no "next to": the folder is local (see `store.local_beside`).
    """
    return local_beside(store, ".probe", replace_suffix=False) / f"{dataset}-{model}-k{k}-t{t}-{variant}"


def save_head(head: LinearHead, out_dir: Path, config: dict) -> Path:
    """``head.safetensors`` (bn.*, linear.*) + ``head.json`` (config and results) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "head.safetensors"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": HEAD_FORMAT})
    os.replace(tmp, path)
    _atomic_write_bytes(out_dir / "head.json", json.dumps(config, indent=1).encode())
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


def run_probe(
    stores: Sequence[FeatureStore],
    train: Dataset,
    val: Dataset,
    model: str,
    k: int,
    t: int,
    settings: ProbeSettings,
    out_dir: Path | None = None,
    resume: bool = True,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    stop_after: int | None = None,
    checkpoint_every: int = 200,
    ms_average: str = "softmax",
) -> ProbeReport:
    """Train the head on the first store's training features, evaluate on every store's scale,
    save ``head.safetensors`` + ``head.json`` (with the results) in `out_dir`."""
    started = time.perf_counter()
    if train.name != val.name:
        raise DitfError(f"training and validation datasets differ ({train.name}, {val.name})")
    sources = open_sources(stores, train.name, model, k, t, settings.variant)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(stores[0].path, train.name, model, k, t,
                                                                       settings.variant)
    head, info = train_probe(sources[0], train, settings, out_dir, resume=resume, device=device, workers=workers,
                             progress=progress, stop_after=stop_after, checkpoint_every=checkpoint_every)
    num_classes, ignore_index, names = _num_classes(val)
    report = ProbeReport(
        out_dir=str(out_dir), head=str(out_dir / "head.safetensors"), key=sources[0].arrays.path,
        variant=settings.variant, scales=[s.scale for s in sources], steps=info["steps"],
        total_steps=info["total_steps"], resumed_from=info["resumed_from"], seconds=0.0, finished=info["finished"],
        class_names=names,
    )
    if not info["finished"]:
        report.seconds = time.perf_counter() - started
        return report
    results = evaluate_probe(head, sources, val, settings.variant, device=device, workers=workers, progress=progress,
                             ms_average=ms_average)
    report.single_scale, report.multi_scale = results["single_scale"], results["multi_scale"]
    config = {
        "format": HEAD_FORMAT,
        "architecture": "BatchNorm2d(in_channels, eps=1e-5) + Conv2d(in_channels, num_classes, 1) on the feature "
                        "grid, logits bilinearly upsampled (align_corners=False); weights bn.*, linear.* "
                        "(linear.weight = conv weight without its 1x1 axes)",
        "in_channels": sources[0].hidden_size,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "class_names": names,
        "dataset": train.name,
        "model": model,
        "k": k,
        "t": t,
        "variant": settings.variant,
        "settings": asdict(settings),
        "train_split": train.split,
        "val_split": val.split,
        "stores": [str(s.store.path) for s in sources],
        "scales": report.scales,
        "feature_config": sources[0].arrays.config,
        "steps": info["steps"],
        "ms_average": ms_average,
        "results": {"single_scale": report.single_scale, "multi_scale": report.multi_scale},
    }
    save_head(head, out_dir, config)
    report.seconds = time.perf_counter() - started
    return report
