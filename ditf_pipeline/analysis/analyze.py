"""Massive activations, seen from the cache: the statistics behind `ditf analyze` and `ditf show`.

Everything here reads cached arrays (the DiT never runs):

* `analyze_key` - per (dataset, model, k, t): channels ranked by mean |activation| over tokens,
  mean +- std over tokens of the top ranks and of ranks 10 and 20, the median (paper Table 1),
  the massive channels by the 100x-median criterion (`features.detect_massive_channels`), their
  rank among the AdaLN gate entries (Figure 4), and the same statistics after AdaLN and after
  channel discard (Figure 5);
* `pca_rgb` - PCA of feature maps to RGB, fitted jointly over the shown images;
* `pck_grid` - PCK of stored predictions at every (k, t), for the k x t plot (Figure 12);
* `keypoint_correct`, `dense_matches` - what `ditf show` draws.

Statistics stream over images (per-channel sums in float64), so a real Flux key (3072 channels,
1600 tokens per image) never holds more than one image's features at a time. Torch is imported
inside the functions that need it, so `ditf show` without `--dense` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import DitfError

#: ranks reported per stage (paper Table 1: top-1..3; and ranks 10 and 20 for contrast)
STAT_RANKS = (1, 2, 3, 10, 20)
#: the stages of Figure 5: raw stream, after AdaLN, after channel discard (script order) + AdaLN
STAGES = ("raw", "adaln", "adaln+cd")
#: tokens per image kept for the median of |activation| over all entries
_MEDIAN_TOKENS = 4096


def sample_rows(complete: np.ndarray, sample: int | None) -> list[int]:
    """Rows used for statistics: the first `sample` complete images (all when `sample` is 0/None).

    The same rule as `predict.resolve_channels` ("auto"), so the default sample of 32 gives the
    channel set `--channels auto` would detect on its own.
    """
    rows = np.flatnonzero(np.asarray(complete, dtype=bool))
    if sample:
        rows = rows[:sample]
    return [int(r) for r in rows]


class _Accumulator:
    """Per-channel sums of |a| and |a|^2 over tokens, plus a token sample for the median."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.total = np.zeros(dim, np.float64)
        self.squares = np.zeros(dim, np.float64)
        self.count = 0
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def add(self, magnitude: np.ndarray) -> None:
        magnitude = magnitude.reshape(-1, magnitude.shape[-1]).astype(np.float64)
        self.total += magnitude.sum(axis=0)
        self.squares += np.square(magnitude).sum(axis=0)
        self.count += magnitude.shape[0]
        if magnitude.shape[0] > _MEDIAN_TOKENS:
            magnitude = magnitude[self.rng.choice(magnitude.shape[0], _MEDIAN_TOKENS, replace=False)]
        self.samples.append(magnitude.astype(np.float32))

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def std(self) -> np.ndarray:
        mean = self.mean()
        return np.sqrt(np.maximum(self.squares / max(self.count, 1) - mean**2, 0.0))

    def median_abs(self) -> float:
        return float(np.median(np.concatenate(self.samples))) if self.samples else float("nan")


def stage_summary(mean: np.ndarray, std: np.ndarray, median_abs: float, ratio: float,
                  ranks: Sequence[int] = STAT_RANKS) -> dict:
    """Table 1 row of one stage: ranked channels, mean +- std at `ranks`, medians, massive set."""
    from ..match.features import massive_from_means  # the one 100x-median rule (also `--channels auto`)

    order = np.argsort(-mean, kind="stable")
    median_mean = float(np.median(mean))
    return {
        "ranking": [int(c) for c in order[:20]],
        "ranks": [
            {"rank": int(r), "channel": int(order[r - 1]), "mean": float(mean[order[r - 1]]), "std": float(std[order[r - 1]])}
            for r in ranks if r <= len(order)
        ],
        "median": median_abs,
        "median_channel_mean": median_mean,
        "top_over_median": float(mean[order[0]] / median_mean) if median_mean > 0 else float("inf"),
        "massive": massive_from_means(mean, ratio),
    }


def gate_coincidence(massive: Sequence[int], gate: np.ndarray, top: int = 10) -> dict:
    """Where the massive channels sit among the AdaLN gate entries (paper Figure 4).

    Channels are ranked by |gate| (rank 1 = largest, ties by channel index); each massive channel
    gets its rank, and `overlap` is the share of massive channels among the top-n |gate| channels
    (n = number of massive channels; None when there are none).
    """
    gate = np.asarray(gate, dtype=np.float64).reshape(-1)
    order = np.argsort(-np.abs(gate), kind="stable")
    rank = np.empty(len(gate), dtype=np.int64)
    rank[order] = np.arange(1, len(gate) + 1)
    massive = [int(c) for c in massive]
    n = len(massive)
    hits = sorted(set(massive) & {int(c) for c in order[:n]})
    return {
        "massive": [{"channel": c, "gate": float(gate[c]), "abs_gate_rank": int(rank[c])} for c in massive],
        "top_gate": [{"channel": int(c), "gate": float(gate[c])} for c in order[: max(top, n)]],
        "overlap": (len(hits) / n) if n else None,
        "overlap_channels": hits,
        "coincide": bool(n) and len(hits) == n,
    }


@dataclass
class KeyAnalysis:
    """Result of `analyze_key`: a JSON-ready `summary` plus per-channel arrays for the plots."""

    summary: dict
    channel_mean: dict[str, np.ndarray]  # stage -> (D,) mean |a| over tokens
    gate: np.ndarray | None  # (D,) gate averaged over the sampled images (None: no AdaLN)
    example: dict[str, np.ndarray] = field(default_factory=dict)  # stage -> (tokens, D) |a| of one image
    example_row: int | None = None
    rows: list[int] = field(default_factory=list)


def analyze_key(
    arrays,
    sample: int | None = 32,
    ratio: float | None = None,
    channels: Sequence[int] | None = None,
    key: tuple[str, str, int, int] | None = None,
) -> KeyAnalysis:
    """Massive-activation statistics of one feature key (a `store.FeatureArrays`).

    `sample` images (the first complete ones; 0/None = all) are read twice: once for the raw
    stream, AdaLN and the gate, once for the channel-discarded feature (it needs the channel set,
    detected in the first pass unless `channels` is given).
    """
    from ..match.features import MASSIVE_RATIO, compute_feature, massive_from_means

    ratio = MASSIVE_RATIO if ratio is None else float(ratio)
    rows = sample_rows(arrays.complete(), sample)
    if not rows:
        raise DitfError(f"{arrays.path} has no complete image yet: run `ditf extract` first")
    dim = arrays.hidden_size
    has_adaln = "scale" in arrays.modulation_names
    has_gate = "gate" in arrays.modulation_names
    stages = STAGES if has_adaln else STAGES[:1]  # models without AdaLN (DINOv2, UNets): raw only
    acc = {stage: _Accumulator(dim, seed=i) for i, stage in enumerate(stages)}
    gate_sum = np.zeros(dim, np.float64)
    example: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        z, modulation = arrays.read_image(row)
        magnitudes = {"raw": np.abs(z.astype(np.float32)).reshape(-1, dim)}
        if has_adaln:
            magnitudes["adaln"] = compute_feature("adaln", z, modulation).abs().reshape(-1, dim).numpy()
        if has_gate:
            gate_sum += np.asarray(modulation["gate"], dtype=np.float64)
        for stage, magnitude in magnitudes.items():
            acc[stage].add(magnitude)
        if i == 0:
            example = magnitudes
    detected = massive_from_means(acc["raw"].mean(), ratio)
    discard = detected if channels is None else sorted({int(c) for c in channels})
    if has_adaln:
        for i, row in enumerate(rows):
            z, modulation = arrays.read_image(row)
            cd = compute_feature("adaln+cd", z, modulation, discard).abs().reshape(-1, dim).numpy()
            acc["adaln+cd"].add(cd)
            if i == 0:
                example["adaln+cd"] = cd
    gate = gate_sum / len(rows) if has_gate else None
    summary = {
        "key": arrays.path,
        "n_images": len(rows),
        "n_tokens": acc["raw"].count,
        "channels_total": dim,
        "ratio": ratio,
        "massive_channels": detected,
        "discarded_channels": discard,
        "stages": {
            stage: stage_summary(acc[stage].mean(), acc[stage].std(), acc[stage].median_abs(), ratio) for stage in stages
        },
        "gate": gate_coincidence(detected, gate) if gate is not None else None,
    }
    if key:
        summary.update(dataset=key[0], model=key[1], k=int(key[2]), t=int(key[3]))
    return KeyAnalysis(
        summary=summary, channel_mean={stage: acc[stage].mean() for stage in stages}, gate=gate,
        example=example, example_row=rows[0], rows=rows,
    )


def stage_features(arrays, row: int, channels: Sequence[int], stages: Sequence[str] = STAGES) -> dict:
    """stage -> (rows, cols, D) float32 feature map of one image."""
    from ..match.features import compute_feature

    z, modulation = arrays.read_image(row)
    if "scale" not in modulation:  # no AdaLN (a scale-only RMSNorm key has scale and no shift)
        stages = [s for s in stages if s == "raw"]
    return {stage: compute_feature(stage, z, modulation, channels).numpy() for stage in stages}


def pca_rgb(maps: Sequence[np.ndarray], clip: float = 1.0) -> list[np.ndarray]:
    """First three principal components of (h, w, D) maps, fitted jointly, as (h, w, 3) in [0, 1].

    Each component is scaled between its `clip` and 100 - `clip` percentiles over all tokens;
    signs are fixed (largest loading positive), so the colours are deterministic.
    """
    import torch

    if not maps:
        return []
    flat = [torch.as_tensor(np.asarray(m, dtype=np.float32)).reshape(-1, m.shape[-1]) for m in maps]
    tokens = torch.cat(flat).to(torch.float64)
    tokens = tokens - tokens.mean(dim=0, keepdim=True)
    n_comp = min(3, *tokens.shape)
    if tokens.shape[0] <= tokens.shape[1]:  # few tokens: eigenvectors of the Gram matrix
        values, vectors = torch.linalg.eigh(tokens @ tokens.T)
        projected = vectors[:, -n_comp:].flip(1) * values[-n_comp:].flip(0).clamp_min(0).sqrt()
    else:  # few channels: eigenvectors of the covariance
        _, vectors = torch.linalg.eigh(tokens.T @ tokens)
        projected = tokens @ vectors[:, -n_comp:].flip(1)
    # deterministic signs: the token with the largest |score| of each component scores positive
    signs = torch.sign(projected[projected.abs().argmax(dim=0), torch.arange(n_comp)])
    projected = projected * torch.where(signs == 0, 1.0, signs)
    projected = projected.numpy()
    if n_comp < 3:
        projected = np.concatenate([projected, np.zeros((projected.shape[0], 3 - n_comp))], axis=1)
    low = np.percentile(projected, clip, axis=0)
    high = np.percentile(projected, 100 - clip, axis=0)
    scaled = np.clip((projected - low) / np.where(high > low, high - low, 1.0), 0.0, 1.0)
    out, start = [], 0
    for m in maps:
        n = m.shape[0] * m.shape[1]
        out.append(scaled[start : start + n].reshape(m.shape[0], m.shape[1], 3).astype(np.float32))
        start += n
    return out


def pck_grid(store, dataset, model: str, keys: Sequence[tuple[int, int]], prediction_name: str, alpha: float = 0.1,
             aggregation: str = "per_point") -> list[dict]:
    """PCK@alpha ("all") of stored predictions at each (k, t); value None with the reason when missing."""
    from ..score.evaluate import score_pairs
    from ..score.pck import alpha_key

    cells = []
    for k, t in keys:
        try:
            result = score_pairs(store, dataset, model, k, t, prediction_name, [alpha])
            cells.append({"k": int(k), "t": int(t), "pck": result["pck"][alpha_key(alpha)][aggregation]["all"]})
        except DitfError as exc:
            cells.append({"k": int(k), "t": int(t), "pck": None, "reason": str(exc)})
    return cells


def keypoint_correct(pred: np.ndarray, pair, alpha: float, protocol: str) -> np.ndarray:
    """(N,) bool: is each predicted keypoint correct at `alpha` under the protocol's rule (`score.RULES`)."""
    from ..score.pck import RULES, rule_for

    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(pair.trg_kps, dtype=np.float64).reshape(-1, 2)
    if pred.shape != truth.shape:
        raise DitfError(f"pair {pair.pair_id}: {len(pred)} predictions for {len(truth)} keypoints")
    errors = np.hypot(*(pred - truth).T)
    base_protocol = protocol.split("-soft")[0]  # "geoaware-soft11" predictions score with geoaware's rule
    return np.asarray(RULES[rule_for(base_protocol)][0](errors, float(pair.threshold_base), float(alpha)), dtype=bool)


def grid_points(size: tuple[int, int], n: int, margin: float = 0.08, box: Sequence[float] | None = None) -> np.ndarray:
    """(n*n, 2) integer (x, y) points on a regular grid inside a (width, height) image.

    With `box` (x1, y1, x2, y2, e.g. the source object's bounding box) the grid covers the box
    (clipped to the image) instead of the whole image.
    """
    width, height = size
    x1, y1, x2, y2 = (0.0, 0.0, width - 1.0, height - 1.0) if box is None else (float(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0.0), width - 1.0), min(max(x2, 0.0), width - 1.0)))
    y1, y2 = sorted((min(max(y1, 0.0), height - 1.0), min(max(y2, 0.0), height - 1.0)))
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    xs = np.rint(np.linspace(x1 + mx, x2 - mx, n))
    ys = np.rint(np.linspace(y1 + my, y2 - my, n))
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def dense_matches(src_feat, src_size, trg_feat, trg_size, protocol: str = "dift", n: int = 12,
                  points: np.ndarray | None = None, box: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(source points, their nearest-neighbour predictions in the target), with the protocol's matcher.

    The source points are `points`, else an n x n grid over `box` (or the whole source image).
    """
    from ..match.matchers import make_matcher

    points = grid_points(src_size, n, box=box) if points is None else np.asarray(points, dtype=np.float64)
    base, _, window = protocol.partition("-soft")
    options = {"soft_window": int(window)} if base == "geoaware" and window.isdigit() else {}
    return points, make_matcher(base, **options).match(src_feat, src_size, trg_feat, trg_size, points)


def _cell(entry: dict) -> str:
    return f"c{entry['channel']} {entry['mean']:.3g} ± {entry['std']:.2g}"


def render_key_table(summary: dict) -> str:
    """Paper Table 1 layout for one key: a row per stage, mean ± std over tokens at each rank."""
    first = summary["stages"][STAGES[0]]
    headers = ["stage"] + [("top-" if r["rank"] <= 3 else "rank ") + str(r["rank"]) for r in first["ranks"]] + ["median"]
    rows = [
        [stage] + [_cell(entry) for entry in stats["ranks"]] + [f"{stats['median']:.3g}"]
        for stage, stats in summary["stages"].items()
    ]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    raw = summary["stages"][STAGES[0]]
    massive = summary["massive_channels"]
    out = [
        f"{summary['key']}: {summary['n_images']} image(s), {summary['n_tokens']} tokens, "
        f"{summary['channels_total']} channels (|activation|: mean ± std over tokens)",
        line(headers),
        *[line(row) for row in rows],
        f"massive channels (mean |z| > {summary['ratio']:g} x median {raw['median_channel_mean']:.3g}): "
        + (", ".join(map(str, massive)) if massive else "none")
        + f"; top channel at {raw['top_over_median']:.3g} x median",
    ]
    gate = summary["gate"]
    if gate is None:
        out.append("no AdaLN gate stored for this key (a model without AdaLN)")
    elif massive:
        ranks = ", ".join(f"{m['channel']} -> {m['abs_gate_rank']}" for m in gate["massive"])
        verdict = "coincide" if gate["coincide"] else "do not all coincide"
        out.append(
            f"|gate| rank of each massive channel: {ranks}; overlap with the top-{len(massive)} |gate| channels: "
            f"{len(gate['overlap_channels'])}/{len(massive)} ({verdict})"
        )
    else:
        top = ", ".join(str(g["channel"]) for g in gate["top_gate"][:5])
        out.append(f"largest |gate| channels: {top}")
    after = {s: summary["stages"][s]["massive"] for s in STAGES[1:] if s in summary["stages"]}
    if after:
        out.append("still massive after " + "; ".join(f"{s}: {', '.join(map(str, m)) or 'none'}" for s, m in after.items()))
    return "\n".join(out)


def find_pairs(pairs: Sequence, wanted: Sequence[str]) -> list:
    """Pairs by id: the exact id, its leading number ("1" or "000001" for "000001-a-b:cat"), or a unique prefix."""
    by_id = {p.pair_id: p for p in pairs}
    found = []
    for name in wanted:
        if name in by_id:
            found.append(by_id[name])
            continue
        candidates = []
        if name.isdigit():  # the number in front of the id: "1" or "000001"
            candidates = [p for p in pairs if p.pair_id.split("-")[0].lstrip("0") == name.lstrip("0")]
        if not candidates:
            candidates = [p for p in pairs if p.pair_id.startswith(name)]
        if len(candidates) != 1:
            examples = ", ".join(p.pair_id for p in pairs[:3]) or "none"
            what = "no pair" if not candidates else f"{len(candidates)} pairs"
            raise DitfError(f"{what} match --pair {name!r} (ids look like: {examples})")
        found.append(candidates[0])
    return found
