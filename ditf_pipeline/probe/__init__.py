"""The probe stage: linear-probe semantic segmentation from cached features (paper Table 6: ADE20K, mIoU).

A train/evaluate stage of its own: `data` (features per scale, labels, read ahead), `head` (the
linear head and its files), `train` (schedule, optimiser, loop), `checkpoint` (resumable state),
`evaluate` (single- and multi-scale confusion matrices), `metrics` (IoU, accuracy) and `run`
(`run_probe`: train, evaluate, save).

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

from .data import PROBE_VARIANTS, FeatureSource, open_sources
from .evaluate import evaluate_probe
from .head import LinearHead, load_head, save_head
from .metrics import confusion_matrix, iou_from_confusion
from .run import ProbeReport, default_out_dir, run_probe
from .train import ProbeSettings, epoch_order, learning_rate, train_probe

__all__ = ["PROBE_VARIANTS", "FeatureSource", "LinearHead", "ProbeReport", "ProbeSettings", "confusion_matrix",
           "default_out_dir", "epoch_order", "evaluate_probe", "iou_from_confusion", "learning_rate", "load_head",
           "open_sources", "run_probe", "save_head", "train_probe"]
