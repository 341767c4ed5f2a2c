"""DAVIS-2017 semi-supervised scoring: J (region IoU) and F (boundary F-measure).

A re-implementation of davisvideochallenge/davis2017-evaluation (``davis2017/metrics.py``,
``davis2017/evaluation.py``, ``davis2017/utils.py``, ``evaluation_method.py``), numpy + OpenCV
only (no torch, no skimage, no scipy):

* ground truth: every annotation of the sequence, label 255 (void) mapped to 0; the number of
  objects is the largest label of the FIRST annotation; object i is ``labels == i``;
* the first and the last frame are excluded (``[1:-1]``);
* J: |A & B| / |A | B|, 1 when both masks are empty (``db_eval_iou``);
* F: boundaries by ``_seg2bmap`` (1-px boundary, offset half a pixel towards the origin),
  tolerance ``bound_pix = ceil(0.008 * ||(H, W)||)`` pixels (``bound_th >= 1`` is taken as
  pixels), dilation of each boundary with the disk of that radius (skimage ``disk``:
  x^2 + y^2 <= r^2) by ``cv2.dilate``; precision = matched result boundary / result boundary,
  recall = matched GT boundary / GT boundary, with the reference's special cases for empty
  boundaries; F = 2PR / (P + R), 0 when P + R = 0;
* per object: Mean (nanmean over frames), Recall (fraction of frames > 0.5) and Decay (mean of
  the first quarter minus mean of the last quarter, the reference's 4-bin rule);
* global: J-Mean, F-Mean, ... = unweighted means over all objects of all sequences, and
  J&F-Mean = (J-Mean + F-Mean) / 2.

Results are read from ``<results>/<seq>/<frame>.png`` (indexed PNGs) and recomputed on every
call: nothing is cached on disk, so a stale CSV can never be reported (the reference script
silently re-prints an existing ``global_results-*.csv``). Two deliberate differences from the
reference, both where it would ``sys.exit``: a result that never predicts some object scores
that object with empty masks, and any problem is a one-line `DitfError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..datasets.davis import VOID_LABEL, VideoSequence, read_mask
from ..core.errors import DitfError
from ..core.naming import RUN_MARKER  # noqa: F401  (re-exported: the scorer finds runs by it)

BOUND_TH = 0.008


# -- per-frame measures (davis2017/metrics.py) --------------------------------------------------
def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray) -> float | np.ndarray:
    """Jaccard index of binary masks; (..., H, W) inputs give one value per leading index."""
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise DitfError(f"annotation {annotation.shape} and segmentation {segmentation.shape} shapes differ")
    inters = np.sum(segmentation & annotation, axis=(-2, -1))
    union = np.sum(segmentation | annotation, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inters / union
    if np.ndim(j) == 0:
        return 1.0 if union == 0 else float(j)
    j = np.asarray(j, dtype=np.float64)
    j[union == 0] = 1.0
    return j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-px boundary map of a binary mask (``_seg2bmap`` at the mask's own size)."""
    seg = np.asarray(seg).astype(bool)
    if seg.ndim != 2:
        raise DitfError(f"seg2bmap needs a 2-D mask, got shape {seg.shape}")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def disk(radius: float) -> np.ndarray:
    """skimage.morphology.disk: uint8 (2r+1, 2r+1), 1 where x^2 + y^2 <= r^2."""
    r = int(radius)
    grid = np.arange(-r, r + 1)
    xs, ys = np.meshgrid(grid, grid)
    return ((xs**2 + ys**2) <= radius**2).astype(np.uint8)


def bound_pixels(shape: tuple[int, int], bound_th: float = BOUND_TH) -> float:
    """Boundary tolerance in pixels: bound_th itself when >= 1, else ceil(bound_th * diagonal)."""
    return float(bound_th) if bound_th >= 1 else float(np.ceil(bound_th * np.linalg.norm(shape)))


def f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of a binary result against a binary ground truth (one frame)."""
    foreground_mask = np.asarray(foreground_mask).astype(bool)
    gt_mask = np.asarray(gt_mask).astype(bool)
    if foreground_mask.shape != gt_mask.shape:
        raise DitfError(f"result {foreground_mask.shape} and ground truth {gt_mask.shape} shapes differ")
    kernel = disk(bound_pixels(foreground_mask.shape, bound_th))
    fg_boundary = seg2bmap(foreground_mask)
    gt_boundary = seg2bmap(gt_mask)
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), kernel)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), kernel)
    n_fg = int(np.sum(fg_boundary))
    n_gt = int(np.sum(gt_boundary))
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.count_nonzero(fg_boundary & (gt_dil > 0)) / n_fg  # matched result boundary
        recall = np.count_nonzero(gt_boundary & (fg_dil > 0)) / n_gt  # matched GT boundary
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, bound_th: float = BOUND_TH):
    """F per frame for (T, H, W) stacks, or one float for (H, W) masks."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise DitfError(f"annotation {annotation.shape} and segmentation {segmentation.shape} shapes differ")
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, bound_th)
    if annotation.ndim == 3:
        return np.array([f_measure(segmentation[i], annotation[i], bound_th) for i in range(len(annotation))])
    raise DitfError(f"db_eval_boundary does not support arrays with {annotation.ndim} dimensions")


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame values, as ``davis2017/utils.py``."""
    values = np.asarray(per_frame_values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore"):
        mean = float(np.nanmean(values)) if np.any(~np.isnan(values)) else math.nan
        recall = float(np.nanmean(values > 0.5))
    n_bins = 4
    ids = (np.round(np.linspace(1, len(values), n_bins + 1) + 1e-10) - 1).astype(np.int64)
    bins = [values[ids[i] : ids[i + 1] + 1] for i in range(n_bins)]
    first, last = bins[0], bins[3]
    if first.size and last.size and np.any(~np.isnan(first)) and np.any(~np.isnan(last)):
        decay = float(np.nanmean(first) - np.nanmean(last))
    else:
        decay = math.nan
    return mean, recall, decay


# -- one sequence -------------------------------------------------------------------------------
@dataclass
class ObjectScore:
    sequence: str
    object_id: int
    j: np.ndarray  # per evaluated frame
    f: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"  # the reference's per-object row label

    def stats(self) -> dict[str, float]:
        jm, jr, jd = db_statistics(self.j)
        fm, fr, fd = db_statistics(self.f)
        return {
            "J-Mean": jm,
            "J-Recall": jr,
            "J-Decay": jd,
            "F-Mean": fm,
            "F-Recall": fr,
            "F-Decay": fd,
        }


def object_masks(labels: np.ndarray, n_objects: int) -> np.ndarray:
    """(T, H, W) labels -> (n_objects, T, H, W) booleans, object i+1 in row i."""
    ids = np.arange(1, n_objects + 1, dtype=np.int64).reshape(-1, *([1] * labels.ndim))
    return labels[None].astype(np.int64) == ids


def evaluate_sequence(
    name: str, gt_labels: np.ndarray, res_labels: np.ndarray, bound_th: float = BOUND_TH
) -> list[ObjectScore]:
    """Score (T, H, W) label stacks of the frames to evaluate (first/last already dropped).

    Objects are 1..max(gt_labels); `evaluate_results` instead takes the object count from the
    sequence's first annotation, as the reference does.
    """
    return _evaluate(
        name,
        gt_labels,
        res_labels,
        int(gt_labels.max()) if gt_labels.size else 0,
        bound_th,
    )


def _evaluate(
    name: str,
    gt_labels: np.ndarray,
    res_labels: np.ndarray,
    n_objects: int,
    bound_th: float,
) -> list[ObjectScore]:
    if gt_labels.shape != res_labels.shape:
        raise DitfError(f"DAVIS {name}: results {res_labels.shape} and ground truth {gt_labels.shape} shapes differ")
    if res_labels.size and int(res_labels.max()) > n_objects:
        raise DitfError(
            f"DAVIS {name}: a result PNG holds label {int(res_labels.max())} but the sequence has only "
            f"{n_objects} object(s)"
        )
    gt = object_masks(gt_labels, n_objects)
    res = object_masks(res_labels, n_objects)
    scores = []
    for i in range(n_objects):
        j = np.atleast_1d(db_eval_iou(gt[i], res[i])).astype(np.float64)
        f = np.array(
            [f_measure(res[i, t], gt[i, t], bound_th) for t in range(gt.shape[1])],
            dtype=np.float64,
        )
        scores.append(ObjectScore(name, i + 1, j, f))
    return scores


# -- whole split --------------------------------------------------------------------------------
@dataclass
class DavisResult:
    objects: list[ObjectScore]
    results_dir: str = ""
    bound_th: float = BOUND_TH
    notes: list[str] = field(default_factory=list)

    def global_scores(self) -> dict[str, float]:
        """J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay over all objects."""
        if not self.objects:
            raise DitfError("no DAVIS objects were scored")
        stats = [o.stats() for o in self.objects]
        out = {key: float(np.mean([s[key] for s in stats])) for key in stats[0]}
        return {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}

    def per_object(self) -> dict[str, dict[str, float]]:
        return {o.name: o.stats() for o in self.objects}

    def per_sequence(self) -> dict[str, dict[str, float]]:
        """Per sequence: means over its objects of J-Mean / F-Mean and their average."""
        seqs: dict[str, list[dict[str, float]]] = {}
        for o in self.objects:
            seqs.setdefault(o.sequence, []).append(o.stats())
        out = {}
        for name, stats in seqs.items():
            jm = float(np.mean([s["J-Mean"] for s in stats]))
            fm = float(np.mean([s["F-Mean"] for s in stats]))
            out[name] = {
                "J&F-Mean": (jm + fm) / 2,
                "J-Mean": jm,
                "F-Mean": fm,
                "objects": len(stats),
            }
        return out

    def to_dict(self) -> dict:
        """The report: every J / F statistic in percent, as the paper and the DAVIS leaderboard print
        them (the methods above keep davis2017-evaluation's 0-1 fractions)."""
        return {
            "protocol": "davis2017-evaluation semi-supervised (first and last frame excluded)",
            "unit": "percent",
            "bound_th": self.bound_th,
            "results_dir": self.results_dir,
            "global": _percent(self.global_scores()),
            "per_sequence": {name: _percent(v) for name, v in self.per_sequence().items()},
            "per_object": {name: _percent(v) for name, v in self.per_object().items()},
            "notes": list(self.notes),
        }


def _percent(scores: dict) -> dict:
    """J/F statistics x 100; counts (``objects``) unchanged."""
    return {key: 100.0 * value if key.startswith(("J", "F")) else value for key, value in scores.items()}


def _check_run_marker(results_dir: Path) -> None:
    marker = results_dir / RUN_MARKER
    if not marker.is_file():
        return  # results written by another tool: score them as they are
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DitfError(f"cannot read propagation marker {marker}: {exc}") from exc
    if not isinstance(info, dict) or info.get("status") != "complete":
        raise DitfError(
            f"{results_dir} holds an unfinished propagation run ({marker} says status "
            f"{info.get('status') if isinstance(info, dict) else info!r}); re-run the propagation"
        )


def evaluate_results(
    sequences: Sequence[VideoSequence],
    results_dir: Path | str,
    bound_th: float = BOUND_TH,
) -> DavisResult:
    """Score ``<results_dir>/<seq>/<frame>.png`` against the sequences' annotations.

    Every annotation of every sequence must exist; every evaluated frame (all but the first
    and last) must have a result PNG of the annotation's size.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DitfError(f"DAVIS results folder {results_dir} does not exist")
    _check_run_marker(results_dir)
    objects: list[ObjectScore] = []
    for seq in sequences:
        missing = [str(p) for p, m in zip(seq.frames, seq.gt_masks) if m is None]
        if missing:
            raise DitfError(f"DAVIS {seq.name}: no annotation for {len(missing)} frame(s), e.g. {missing[0]}")
        first = read_mask(seq.gt_masks[0])
        first = np.where(first == VOID_LABEL, 0, first)
        n_objects = int(first.max())
        evaluated = list(range(1, len(seq) - 1))
        if not evaluated:
            raise DitfError(f"DAVIS {seq.name}: needs at least 3 frames to score (first and last are excluded)")
        gt = []
        res = []
        for t in evaluated:
            mask_path = seq.gt_masks[t]
            labels = read_mask(mask_path)
            gt.append(np.where(labels == VOID_LABEL, 0, labels))
            result_path = results_dir / seq.name / f"{mask_path.stem}.png"
            if not result_path.is_file():
                raise DitfError(f"DAVIS {seq.name}: result {result_path} is missing")
            result = read_mask(result_path)
            if result.shape != gt[-1].shape:
                raise DitfError(
                    f"DAVIS {seq.name}: result {result_path} is {result.shape[1]}x{result.shape[0]}, "
                    f"annotation is {gt[-1].shape[1]}x{gt[-1].shape[0]}"
                )
            res.append(result)
        objects.extend(_evaluate(seq.name, np.stack(gt), np.stack(res), n_objects, bound_th))
    return DavisResult(objects=objects, results_dir=str(results_dir), bound_th=bound_th)
