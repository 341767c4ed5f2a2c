"""Scoring a trained head on the validation split, at one image scale and averaged over several.

The multi-scale prediction averages the per-scale softmax probabilities after upsampling to the
label size (mmseg's ``aug_test``; ``ms_average="logits"`` averages logits instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.errors import DitfError
from ..datasets.base import Dataset
from .data import FeatureSource, num_classes, read_ahead
from .head import LinearHead
from .metrics import confusion_matrix, summary
from .train import torch_device

__all__ = ["evaluate_probe"]


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
    classes, ignore_index, names = num_classes(val)
    keys = [record.key for record in val.images()]
    for source in sources:
        source.check(keys, val.split, val.name)
    dev = torch_device(device)
    head = head.to(dev).eval()

    def load(key: str):
        return [source.feature(key, variant) for source in sources], val.load_label(key)

    single = np.zeros((classes, classes), dtype=np.int64)
    multi = np.zeros_like(single)
    items = read_ahead(keys, load, workers, lookahead=4)
    with torch.no_grad():
        bar = progress_display(len(keys), "probe eval", "img", enabled=progress)
        for features, labels in items:
            size = labels.shape
            total = None
            for i, feature in enumerate(features):
                logits = head.logit_maps([feature.to(dev)], [size])[0]
                if i == 0:
                    single += confusion_matrix(logits.argmax(0).cpu().numpy(), labels, classes, ignore_index)
                if len(features) > 1:
                    part = logits.softmax(0) if ms_average == "softmax" else logits
                    total = part if total is None else total + part
            if total is not None:
                multi += confusion_matrix(total.argmax(0).cpu().numpy(), labels, classes, ignore_index)
            bar.update(1)
        bar.close()
    head.to("cpu")
    out = {"single_scale": summary(single, names), "multi_scale": None}
    if len(sources) > 1:
        out["multi_scale"] = summary(multi, names)
    return out
