"""`ditf probe`'s stage: train the head on the first store's training features, evaluate on every
store's scale, save ``head.safetensors`` + ``head.json`` (with the results)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import DitfError
from ..datasets.base import Dataset
from ..store.feature_store import FeatureStore, local_beside
from .data import num_classes, open_sources
from .evaluate import evaluate_probe
from .head import HEAD_FORMAT, save_head
from .train import ProbeSettings, train_probe

__all__ = ["ProbeReport", "default_out_dir", "run_probe"]


@dataclass
class ProbeReport:
    """What one probe run did: where the head is, the key and scales, its steps and its scores."""

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


def default_out_dir(store: str | Path, dataset: str, model: str, k: int, t: int, variant: str) -> Path:
    """``<store>.probe/<dataset>-<model>-k<k>-t<t>-<variant>`` next to the (first) store.

    An object store has no "next to": the folder is local (see `store.local_beside`).
    """
    return local_beside(store, ".probe", replace_suffix=False) / f"{dataset}-{model}-k{k}-t{t}-{variant}"


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
    classes, ignore_index, names = num_classes(val)
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
        "num_classes": classes,
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
