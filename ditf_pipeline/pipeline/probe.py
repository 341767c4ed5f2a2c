"""`ditf probe`: linear-probe semantic segmentation (ADE20K, paper Table 6) from cached features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .commands import DEFAULT_STORE, single_key

__all__ = ["ProbeRun", "probe_per_class", "probe_table", "run_probe"]

if TYPE_CHECKING:
    from ..probe import ProbeReport, ProbeSettings


@dataclass
class ProbeRun:
    """The probe's report and the context a JSON result carries (dataset, key, stores, features)."""

    report: ProbeReport
    context: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {**self.context, **self.report.to_json()}


def run_probe(
    *,
    model: str,
    dataset: str = "ade20k",
    data_root: Path | str | None = None,
    stores: Sequence[str | Path] | None = None,
    k: Sequence[int] | int | None = None,
    t: Sequence[int] | int | None = None,
    settings: ProbeSettings | None = None,
    train_split: str = "training",
    val_split: str = "validation",
    out: Path | None = None,
    resume: bool = True,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    checkpoint_every: int = 200,
    ms_average: str = "softmax",
) -> ProbeRun:
    """Train a linear head on the first store's training features and score every store's scale.

    The key follows the rule of every command: the model's default key when stored, else the
    only one, else an error listing them.
    """
    from ..probe import ProbeSettings, run_probe as train_and_score
    from ..datasets import get_dataset
    from ..store.feature_store import FeatureStore
    from ..selection import select_key

    train = get_dataset(dataset, data_root, train_split)
    val = get_dataset(dataset, data_root, val_split)
    opened = [FeatureStore(path, read_only=True) for path in (stores or [DEFAULT_STORE])]
    k_, t_ = select_key(opened[0], train.name, model, *single_key(k, t))
    settings = settings or ProbeSettings()
    report = train_and_score(opened, train, val, model, k_, t_, settings, out_dir=out, resume=resume, device=device,
                             workers=workers, progress=progress, checkpoint_every=checkpoint_every,
                             ms_average=ms_average)
    context = {"dataset": val.name, "split": val.split, "train_split": train.split, "model": model, "k": k_, "t": t_,
               "variant": settings.variant, "stores": [str(s.path) for s in opened], "unit": "percent",
               "features": opened[0].open_features(train.name, model, k_, t_).config}
    return ProbeRun(report, context)


def probe_table(report: ProbeReport) -> str:
    """mIoU, mAcc and aAcc, single-scale and (with several stores) multi-scale."""
    lines = [f"probe {report.key} variant {report.variant}: {report.steps} steps, scales {report.scales}"]
    lines.append(f"{'':<24} {'mIoU':>7} {'mAcc':>7} {'aAcc':>7}")
    rows = [("single-scale", report.single_scale)]
    if report.multi_scale is not None:
        rows.append((f"multi-scale ({len(report.scales)})", report.multi_scale))
    for name, result in rows:
        lines.append(f"{name:<24} {result['miou']:>7.2f} {result['macc']:>7.2f} {result['aacc']:>7.2f}")
    return "\n".join(lines)


def probe_per_class(report: ProbeReport) -> str:
    """The IoU of every class (and multi-scale beside it)."""
    lines = [f"{'class':<22} {'IoU':>7}" + (f" {'IoU ms':>7}" if report.multi_scale else "")]
    for name, iou in report.single_scale["per_class_iou"].items():
        cells = [iou] + ([report.multi_scale["per_class_iou"][name]] if report.multi_scale else [])
        lines.append(f"{name:<22} " + " ".join(f"{'-':>7}" if v is None else f"{v:>7.2f}" for v in cells))
    return "\n".join(lines)


def __getattr__(name: str):
    """`ProbeSettings` on first use: the probe's module imports torch, which `ditf score` never loads."""
    if name == "ProbeSettings":
        from ..probe import ProbeSettings

        return ProbeSettings
    raise AttributeError(name)
