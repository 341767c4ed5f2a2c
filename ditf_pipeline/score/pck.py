"""PCK of predicted keypoints, every aggregation the literature mixes up, each one named.

numpy only: no torch, no zarr, nothing from `ditf_pipeline.models`, so results can be
re-scored anywhere from saved predictions.

A keypoint is correct when its error (Euclidean, original target pixels) passes the threshold
alpha * pair.threshold_base under a named rule:

* ``<=`` (dift protocol; DIFT / DiTF scripts: ``dist / threshold <= alpha``)
* ``<``  (geoaware protocol; GeoAware-SC: ``err < alpha * threshold``, strict. GeoAware
  compares in its 840 frame with a threshold scaled by the same factor as the errors, which is
  the same test in original pixels; see `match.geoaware_threshold_scale`.)

Aggregations, all reported:

* ``per_image``  mean over pairs of (correct / keypoints of the pair); "all" pools every pair
  (DIFT/DiTF "All", GeoAware's pair-weighted category mean); paper Table 3;
* ``per_point``  total correct / total keypoints; paper Table 2;
* ``mean`` inside either: the unweighted mean of the per-category values (DiTF's "Mean").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..datasets.base import Pair
from ..core.errors import DitfError
from ..core.naming import PROTOCOL_RULES

DEFAULT_ALPHAS = (0.01, 0.05, 0.1)

#: rule name -> (comparison on (error, threshold_base, alpha), human-readable description)
RULES = {
    "<=": (
        lambda err, base, alpha: err / base <= alpha,
        "correct if error <= alpha * threshold (DIFT/DiTF: dist / threshold <= alpha)",
    ),
    "<": (
        lambda err, base, alpha: err < alpha * base,
        "correct if error < alpha * threshold (GeoAware-SC, strict)",
    ),
}



def rule_for(protocol: str) -> str:
    if protocol not in PROTOCOL_RULES:
        from ..validate import unknown

        raise unknown("protocol", protocol, list(PROTOCOL_RULES))
    return PROTOCOL_RULES[protocol]


def describe_rule(rule: str) -> str:
    """The printable line that goes with every score."""
    if rule not in RULES:
        raise DitfError(f"unknown threshold rule {rule!r}; known rules: {', '.join(RULES)}")
    return f"{rule}: {RULES[rule][1]}"


def alpha_key(alpha: float) -> str:
    """JSON key of an alpha: 0.1 -> "0.1", 0.05 -> "0.05"."""
    return f"{alpha:g}"


def correct_matrix(
    predictions: Sequence[np.ndarray], pairs: Sequence[Pair], alphas: Sequence[float], rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of every keypoint, (len(alphas), total_keypoints) bool, and each point's pair index."""
    if len(predictions) != len(pairs):
        raise DitfError(f"{len(predictions)} predictions for {len(pairs)} pairs")
    if rule not in RULES:
        raise DitfError(f"unknown threshold rule {rule!r}; known rules: {', '.join(RULES)}")
    counts = np.fromiter((len(p.trg_kps) for p in pairs), dtype=np.int64, count=len(pairs))
    total = int(counts.sum())
    predicted = np.empty((total, 2))
    truth = np.empty((total, 2))
    base = np.repeat(np.fromiter((p.threshold_base for p in pairs), dtype=np.float64, count=len(pairs)), counts)
    start = 0
    for i, (pred, pair) in enumerate(zip(predictions, pairs)):
        n = int(counts[i])
        pred = np.asarray(pred, dtype=np.float64)
        if pred.shape != (n, 2):
            raise DitfError(f"pair {pair.pair_id}: predictions have shape {pred.shape}, expected ({n}, 2)")
        predicted[start : start + n] = pred
        truth[start : start + n] = pair.trg_kps
        start += n
    errors = np.hypot(*(predicted - truth).T)
    compare = RULES[rule][0]
    correct = np.stack([compare(errors, base, float(a)) for a in alphas]) if alphas else np.zeros((0, total), bool)
    return correct, np.repeat(np.arange(len(pairs)), counts)


def pck(
    predictions: Sequence[np.ndarray],
    pairs: Sequence[Pair],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    protocol: str = "dift",
    rule: str | None = None,
    *,
    dataset: str = "",
    model: str = "",
    k: int | None = None,
    t: int | None = None,
    variant: str = "",
) -> dict:
    """Score predictions ((N_i, 2) predicted (x, y) per pair, original target pixels).

    Returns a plain JSON-ready dict: dataset, model, k, t, variant, protocol, n_pairs,
    n_points, threshold_rule, and pck[alpha_key][aggregation] = {"all", "mean", <category>...}
    in percent at full float precision (rounding is the renderer's job). `rule` defaults to the protocol's. Pairs without
    keypoints count in n_pairs but in no average.
    """
    rule = rule_for(protocol) if rule is None else rule
    correct, pair_of_point = correct_matrix(predictions, pairs, alphas, rule)
    n_pairs = len(pairs)
    points_per_pair = np.bincount(pair_of_point, minlength=n_pairs)
    categories = sorted({p.category for p in pairs})
    category_index = {c: i for i, c in enumerate(categories)}
    category_of_pair = np.fromiter((category_index[p.category] for p in pairs), dtype=np.int64, count=n_pairs)
    scored = points_per_pair > 0

    table: dict[str, dict] = {}
    for a, alpha in enumerate(alphas):
        # percent computed as 100 * correct / points in one division, never rounded: 21 of 800 is 2.625
        correct_per_pair = np.bincount(pair_of_point, weights=correct[a], minlength=n_pairs)
        image_value = np.divide(100.0 * correct_per_pair, points_per_pair, out=np.zeros(n_pairs), where=scored)
        per_image = {"all": float(image_value[scored].mean()) if scored.any() else float("nan")}
        per_point = {"all": float(100.0 * correct_per_pair.sum() / max(points_per_pair.sum(), 1))}
        by_category_image, by_category_point = {}, {}
        for c, name in enumerate(categories):
            in_category = category_of_pair == c
            mask = in_category & scored
            by_category_image[name] = float(image_value[mask].mean()) if mask.any() else float("nan")
            by_category_point[name] = float(
                100.0 * correct_per_pair[in_category].sum() / max(points_per_pair[in_category].sum(), 1))
        per_image["mean"] = float(np.nanmean(list(by_category_image.values()))) if categories else float("nan")
        per_point["mean"] = float(np.mean(list(by_category_point.values()))) if categories else float("nan")
        per_image.update(by_category_image)
        per_point.update(by_category_point)
        table[alpha_key(alpha)] = {"per_image": per_image, "per_point": per_point}

    return {
        "dataset": dataset,
        "model": model,
        "k": k,
        "t": t,
        "variant": variant,
        "protocol": protocol,
        "n_pairs": n_pairs,
        "n_points": int(points_per_pair.sum()),
        "threshold_rule": describe_rule(rule),
        "alphas": [float(a) for a in alphas],
        "unit": "percent",
        "pck": table,
    }


def per_pair_rows(
    predictions: Sequence[np.ndarray],
    pairs: Sequence[Pair],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    protocol: str = "dift",
    rule: str | None = None,
) -> list[dict]:
    """One flat row per pair for analyses in pandas: ids, category, keypoint count, threshold base,
    and per alpha the correct count and the pair's PCK in percent (None without keypoints).

    Averaging the `pck@a` column over pairs gives the per-image PCK; summing `correct@a` over
    pairs and dividing by the summed `n_points` gives the per-point PCK.
    """
    rule = rule_for(protocol) if rule is None else rule
    correct, pair_of_point = correct_matrix(predictions, pairs, alphas, rule)
    points = np.bincount(pair_of_point, minlength=len(pairs))
    rows = []
    for i, pair in enumerate(pairs):
        row = {"pair_id": pair.pair_id, "category": pair.category, "src": pair.src_key, "trg": pair.trg_key,
               "n_points": int(points[i]), "threshold_base": float(pair.threshold_base)}
        for a, alpha in enumerate(alphas):
            hits = int(correct[a][pair_of_point == i].sum())
            row[f"correct@{alpha_key(alpha)}"] = hits
            row[f"pck@{alpha_key(alpha)}"] = 100.0 * hits / points[i] if points[i] else None
        rows.append(row)
    return rows
