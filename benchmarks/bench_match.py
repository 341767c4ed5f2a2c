"""Matching and scoring speed on a SPair-71k-sized synthetic workload.

Workload: 12,234 pairs over 481 images in 18 categories (pairs grouped by category, so
targets repeat as in the real test split), Flux-sized caches (40x30 or 30x40 tokens, 3072
channels), images of ~500x375, ~10 keypoints per pair, random features (a small pool of
distinct maps is reused to keep memory flat; every image still has its own cache key).

Reports:
* the fast `DiftMatcher` per pair (target norm maps included, amortised over the pairs run)
  and extrapolated to the full workload;
* the naive reference (`match_dift_reference`) on a sample of pairs, extrapolated, the speed
  ratio (target >= 50x) and whether the predictions are identical on the sample;
* full scoring of 12,234 pairs (target < 5 s);
* FAISS vs torch matmul for the geoaware 60x60 nearest-neighbour search.

    python benchmarks/bench_match.py [--pairs N] [--naive-pairs M] [--quick | --smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditf_pipeline.datasets.base import Pair  # noqa: E402
from ditf_pipeline.match import DiftMatcher, GeoAwareMatcher, match_dift_reference, nearest_neighbours  # noqa: E402
from ditf_pipeline.score import pck  # noqa: E402

N_PAIRS, N_IMAGES, N_CATEGORIES, CHANNELS = 12_234, 481, 18, 3072
SHAPES = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((30, 40), (500, 333)), ((40, 30), (333, 500))]


def build_workload(seed: int = 0):
    """Images (grid shape, size, pool slot, category) and pairs (src, trg, keypoints)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(N_IMAGES):
        grid, size = SHAPES[int(rng.integers(len(SHAPES)))]
        images.append({"key": f"img{i}", "grid": grid, "size": size, "category": i * N_CATEGORIES // N_IMAGES})
    by_category = [[i for i, im in enumerate(images) if im["category"] == c] for c in range(N_CATEGORIES)]
    pairs = []
    for p in range(N_PAIRS):
        members = by_category[p * N_CATEGORIES // N_PAIRS]
        src, trg = rng.choice(members, 2, replace=False)
        n = int(rng.integers(6, 15))  # ~10 keypoints
        w, h = images[src]["size"]
        kps = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], 1).astype(float)
        tw, th = images[trg]["size"]
        truth = np.stack([rng.integers(0, tw, n), rng.integers(0, th, n)], 1).astype(float)
        pairs.append({"src": int(src), "trg": int(trg), "kps": kps, "truth": truth})
    return images, pairs


class FeaturePool:
    """A few random float32 maps per grid shape; image i uses slot i % size of its shape."""

    def __init__(self, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.maps = {grid: [torch.randn(*grid, CHANNELS, generator=g) for _ in range(size)] for grid in {s[0] for s in SHAPES}}
        self.size = size

    def __call__(self, index: int, grid) -> torch.Tensor:
        return self.maps[grid][index % self.size]


def time_fast(images, pairs, pool, n_pairs):
    matcher = DiftMatcher()
    predictions = []
    start = time.perf_counter()
    for pair in pairs[:n_pairs]:
        s, t = images[pair["src"]], images[pair["trg"]]
        predictions.append(
            matcher.match(pool(pair["src"], s["grid"]), s["size"], pool(pair["trg"], t["grid"]), t["size"], pair["kps"], trg_key=t["key"])
        )
    elapsed = time.perf_counter() - start
    cache = matcher._inverse_norms
    return elapsed, predictions, cache.misses


def time_naive(images, pairs, pool, indices, fast_predictions):
    start = time.perf_counter()
    identical = 0
    for i in indices:
        pair = pairs[i]
        s, t = images[pair["src"]], images[pair["trg"]]
        reference = match_dift_reference(pool(pair["src"], s["grid"]), s["size"], pool(pair["trg"], t["grid"]), t["size"], pair["kps"])
        identical += int(np.array_equal(reference, fast_predictions[i]))
    return time.perf_counter() - start, identical


def time_scoring(images, pairs):
    rng = np.random.default_rng(1)
    records, predictions = [], []
    for i, pair in enumerate(pairs):
        t = images[pair["trg"]]
        records.append(Pair(str(i), f"c{t['category']}", "s", t["key"], pair["kps"], pair["truth"], images[pair["src"]]["size"], t["size"], 200.0))
        predictions.append(pair["truth"] + rng.normal(0, 25, pair["truth"].shape))
    start = time.perf_counter()
    result = pck(predictions, records)
    return time.perf_counter() - start, result


def time_nn(repeats: int):
    """Plain cosine NN as in the geoaware hard argmax: 10 queries vs 3600 x 3072."""
    import faiss

    g = torch.Generator().manual_seed(2)
    database = F.normalize(torch.randn(3600, CHANNELS, generator=g), dim=1)
    queries = F.normalize(torch.randn(10, CHANNELS, generator=g), dim=1)
    out = {}
    for backend in ("torch", "faiss"):
        nearest_neighbours(queries, database, backend)
        start = time.perf_counter()
        for _ in range(repeats):
            result = nearest_neighbours(queries, database, backend)
        out[backend] = (time.perf_counter() - start) / repeats
        out[f"{backend}_index"] = result
    index = faiss.IndexFlatIP(CHANNELS)
    start = time.perf_counter()
    for _ in range(repeats):
        index.reset()
        index.add(database.numpy())
        index.search(queries.numpy(), 1)
    out["faiss_IndexFlatIP_add_search"] = (time.perf_counter() - start) / repeats
    out["identical"] = bool(torch.equal(out.pop("torch_index"), out.pop("faiss_index")))
    return out


def time_geoaware(images, pairs, pool, n_pairs):
    matcher = GeoAwareMatcher()
    start = time.perf_counter()
    for pair in pairs[:n_pairs]:
        s, t = images[pair["src"]], images[pair["trg"]]
        matcher.match(pool(pair["src"], s["grid"]), s["size"], pool(pair["trg"], t["grid"]), t["size"], pair["kps"], trg_key=t["key"])
    return (time.perf_counter() - start) / n_pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=N_PAIRS, help="pairs to run through the fast matcher")
    parser.add_argument("--naive-pairs", type=int, default=20, help="pairs to run through the naive reference")
    parser.add_argument("--pool", type=int, default=8, help="distinct random maps per grid shape")
    parser.add_argument("--quick", action="store_true", help="a < 60 s run: 150 fast pairs, 2 naive pairs")
    parser.add_argument("--smoke", action="store_true", help="CI check that the benchmark runs (~20 s): 20 pairs, 1 naive")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.pairs, args.naive_pairs, args.pool = True, min(args.pairs, 20), 1, min(args.pool, 2)
    if args.quick:
        args.pairs, args.naive_pairs, args.pool = min(args.pairs, 150), min(args.naive_pairs, 2), min(args.pool, 4)
    args.pairs = max(1, min(args.pairs, N_PAIRS))
    args.naive_pairs = max(1, min(args.naive_pairs, args.pairs))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    images, pairs = build_workload()
    pool = FeaturePool(args.pool)
    n_kps = sum(len(p["kps"]) for p in pairs)
    print(f"workload: {N_PAIRS} pairs, {N_IMAGES} images, {n_kps} keypoints, {CHANNELS} channels")

    fast_s, predictions, targets = time_fast(images, pairs, pool, args.pairs)
    fast_per_pair = fast_s / args.pairs
    print(f"fast dift matcher: {args.pairs} pairs ({targets} target norm maps) in {fast_s:.1f} s = {1000 * fast_per_pair:.1f} ms/pair")
    how = "measured" if args.pairs == N_PAIRS else "extrapolated"
    print(f"  full workload ({how}): {fast_per_pair * N_PAIRS / 60:.1f} min")

    sample = np.linspace(0, args.pairs - 1, args.naive_pairs).round().astype(int)
    naive_s, identical = time_naive(images, pairs, pool, sample, predictions)
    naive_per_pair = naive_s / len(sample)
    ratio = naive_per_pair / fast_per_pair
    print(f"naive reference: {len(sample)} pairs in {naive_s:.1f} s = {naive_per_pair:.2f} s/pair; full workload (extrapolated) {naive_per_pair * N_PAIRS / 3600:.1f} h")
    print(f"  identical predictions on {identical}/{len(sample)} sampled pairs")
    print(f"  speed ratio naive / fast: {ratio:.0f}x (target >= 50x)")

    score_s, result = time_scoring(images, pairs)
    print(f"scoring {result['n_pairs']} pairs / {result['n_points']} points: {score_s:.2f} s (target < 5 s)")

    nn = time_nn(20 if args.quick else 50)
    print(
        f"geoaware NN, 10 queries vs 3600 x {CHANNELS}: torch matmul {1000 * nn['torch']:.2f} ms, "
        f"faiss.knn {1000 * nn['faiss']:.2f} ms, IndexFlatIP add+search {1000 * nn['faiss_IndexFlatIP_add_search']:.2f} ms; "
        f"identical: {nn['identical']}"
    )
    geo_pairs = min(args.pairs, 60 if args.quick else 300)
    geo_per_pair = time_geoaware(images, pairs, pool, geo_pairs)
    print(f"geoaware matcher (hard): {1000 * geo_per_pair:.1f} ms/pair over {geo_pairs} pairs")

    figures = {
        "fast_pairs": args.pairs,
        "fast_ms_per_pair": 1000 * fast_per_pair,
        "fast_full_workload_min": fast_per_pair * N_PAIRS / 60,
        "naive_pairs": int(len(sample)),
        "naive_s_per_pair": naive_per_pair,
        "identical_pairs": identical,
        "speed_ratio": ratio,
        "scoring_s": score_s,
        "nn_ms": {k: (1000 * v if isinstance(v, float) else v) for k, v in nn.items()},
        "geoaware_ms_per_pair": 1000 * geo_per_pair,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
