"""Matching and scoring speed on a SPair-71k-sized synthetic workload, in CPU time, with a
float64 referee on every pair.

Workload: 12,234 pairs over 481 images in 18 categories (pairs grouped by category, so
targets repeat as in the real test split), Flux-sized float16 maps as the match stage caches
them (40x30 or 30x40 tokens, 3072 channels), images of ~500x375, ~10 keypoints per pair,
random features (a small pool of distinct maps is reused to keep memory flat; every image
still has its own cache key).

Three ways to run the ``dift`` rule (argmax over every target pixel of the cosine between the
bilinearly upsampled maps), all on one intra-op thread:

* fast: `DiftMatcher` (the low-resolution identity, float32), with its per-target norm cache
  (SPair-like target reuse) and, on the naive sample, without it (every target fresh);
* naive: the DIFT rule as written, minus its one gratuitous cost: the source vectors are read
  by bilinear interpolation at the keypoints only, the TARGET map is upsampled in full (256
  channels at a time), normalised and dotted (float32); no cache, as in DIFT's script;
* referee: the same identity in float64 (float64 taps and maps) on every pair the fast path
  runs; on the naive sample it is checked against the float64 full upsampling.

Agreement: the share of keypoints where a path picks the referee's pixel; a disagreement is a
"near tie" when the referee's cosine at the path's pixel is within 1e-5 of its best.

Also: scoring all pairs, and nearest-neighbour searches (torch vs FAISS on the CPU; on a GPU,
torch vs FAISS-GPU for the GeoAware grid, HPatches-sized mutual NN and a dense all-cells search,
and the fast matcher with pairs batched by target).

    python benchmarks/bench_match.py [--pairs N] [--naive-pairs M] [--quick | --smoke] [--device cuda] [--json PATH]

On a GPU machine (`benchmarks/gpu_check.sh` runs it so): ``--device cuda --quick --no-referee``
(faiss is optional: the CUDA image has none; the float64 referee over every pair is the
slow part, ~10 min at full size); the GPU figure is taken after a warm-up block.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditf_pipeline.datasets.base import Pair  # noqa: E402
from ditf_pipeline.match.device import (  # noqa: E402
    faiss_gpu_search,
    faiss_gpus,
    mutual_nearest_neighbours,
    nearest_neighbours,
)
from ditf_pipeline.match.dift import DiftMatcher  # noqa: E402
from ditf_pipeline.match.geoaware import GeoAwareMatcher  # noqa: E402
from ditf_pipeline.match.grids import integer_keypoints as _integer_keypoints  # noqa: E402
from ditf_pipeline.match.taps import upsampled_norms, upsampled_vectors  # noqa: E402
from ditf_pipeline.score.pck import pck  # noqa: E402

N_PAIRS, N_IMAGES, N_CATEGORIES, CHANNELS = 12_234, 481, 18, 3072
SHAPES = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((30, 40), (500, 333)), ((40, 30), (333, 500))]
NEAR_TIE = 1e-5


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
    """A few random float16 maps per grid shape (as the match stage caches them); image i uses
    slot i % size of its shape. Smooth maps (random cells, bilinearly enlarged 2x from a coarser
    grid, plus noise) have the near-ties real features have."""

    def __init__(self, size: int, seed: int = 0, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)
        self.maps = {}
        for grid in {s[0] for s in SHAPES}:
            maps = []
            for _ in range(size):
                coarse = torch.randn(1, CHANNELS, grid[0] // 2, grid[1] // 2, generator=g)
                smooth = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
                maps.append((smooth + 0.3 * torch.randn(*grid, CHANNELS, generator=g)).half().contiguous().to(device))
            self.maps[grid] = maps
        self.size = size

    def __call__(self, index: int, grid) -> torch.Tensor:
        return self.maps[grid][index % self.size]


class Clock:
    """CPU seconds of this process (all threads) and wall seconds of a block."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


# ---- the three paths ----------------------------------------------------------------------------
def naive_scores(src, src_size, trg, trg_size, kps, chunk: int = 256, dtype=torch.float32) -> torch.Tensor:
    """(N, H*W) cosine: source vectors at the keypoints (bilinear), the target upsampled in full."""
    xs, ys = _integer_keypoints(kps, src_size)
    vectors = upsampled_vectors(src.to(dtype), src_size, xs, ys)  # (N, D)
    tw, th = trg_size
    trg = trg.to(dtype)
    numerators = torch.zeros(len(xs), th * tw, dtype=dtype)
    target_sq = torch.zeros(th * tw, dtype=dtype)
    for start in range(0, trg.shape[-1], chunk):
        part = trg[..., start : start + chunk].permute(2, 0, 1)[None]
        flat = F.interpolate(part, size=(th, tw), mode="bilinear", align_corners=False)[0].reshape(part.shape[1], -1)
        numerators += vectors[:, start : start + chunk] @ flat
        target_sq += (flat * flat).sum(0)
        del flat
    source = torch.linalg.vector_norm(vectors, dim=1).clamp_min(1e-12)
    return numerators / source[:, None] / target_sq.sqrt().clamp_min(1e-12)[None]


def referee_scores(src, src_size, trg, trg_size, kps) -> torch.Tensor:
    """(N, H*W) float64 cosine by the low-resolution identity (float64 taps, maps and sums)."""
    src64, trg64 = src.double(), trg.double()
    xs, ys = _integer_keypoints(kps, src_size)
    vectors = upsampled_vectors(src64, src_size, xs, ys)
    h, w, d = trg64.shape
    tw, th = trg_size
    dots = (vectors @ trg64.reshape(h * w, d).T).reshape(-1, 1, h, w)
    numerators = F.interpolate(dots, size=(th, tw), mode="bilinear", align_corners=False).reshape(len(xs), -1)
    source = torch.linalg.vector_norm(vectors, dim=1).clamp_min(1e-300)
    return numerators / source[:, None] / upsampled_norms(trg64, trg_size).reshape(1, -1).clamp_min(1e-300)


def to_xy(best: np.ndarray, width: int) -> np.ndarray:
    return np.stack([best % width, best // width], axis=1).astype(np.float64)


class Agreement:
    """Keypoints where a path picks the referee's pixel; the rest split into near ties and not."""

    def __init__(self) -> None:
        self.points = self.same = self.near_ties = 0

    def add(self, prediction: np.ndarray, referee: torch.Tensor, width: int) -> None:
        best = referee.argmax(dim=1).numpy()
        picked = (prediction[:, 1] * width + prediction[:, 0]).astype(np.int64)
        same = picked == best
        rows = np.arange(len(best))
        gap = (referee[rows, best] - referee[rows, picked]).numpy()
        self.points += len(best)
        self.same += int(same.sum())
        self.near_ties += int(((~same) & (gap <= NEAR_TIE)).sum())

    def as_dict(self) -> dict:
        return {"keypoints": self.points, "agree": self.same, "rate": self.same / max(self.points, 1),
                "disagree_near_ties": self.near_ties, "disagree_other": self.points - self.same - self.near_ties}

    def line(self) -> str:
        return (f"{self.same}/{self.points} keypoints ({100 * self.same / max(self.points, 1):.2f}%); "
                f"disagreements at near ties (<= {NEAR_TIE:g}): {self.near_ties}, others: {self.points - self.same - self.near_ties}")


def run_fast(images, pairs, pool, n_pairs, referee: bool):
    """Fast matcher over the first n_pairs, CPU-timed; then the referee on every one of them."""
    matcher = DiftMatcher()
    predictions = []
    with Clock() as clock:
        for pair in pairs[:n_pairs]:
            s, t = images[pair["src"]], images[pair["trg"]]
            predictions.append(matcher.match(pool(pair["src"], s["grid"]), s["size"], pool(pair["trg"], t["grid"]),
                                             t["size"], pair["kps"], trg_key=t["key"]))
    agreement = Agreement()
    if referee:
        for pair, prediction in zip(pairs[:n_pairs], predictions):
            s, t = images[pair["src"]], images[pair["trg"]]
            scores = referee_scores(pool(pair["src"], s["grid"]), s["size"], pool(pair["trg"], t["grid"]), t["size"], pair["kps"])
            agreement.add(prediction, scores, t["size"][0])
    return clock, predictions, matcher._inverse_norms.misses, agreement


def run_naive(images, pairs, pool, indices, fast_predictions):
    """The naive reference on the sample (CPU-timed), the fast matcher with fresh targets on the
    same pairs, and both against the referee (checked against the float64 full upsampling)."""
    naive, fresh, referee_vs_full = Agreement(), Agreement(), Agreement()
    fast_on_sample = Agreement()
    naive_cpu = fresh_cpu = 0.0
    fresh_matcher = DiftMatcher(cache_bytes=0)
    for i in indices:
        pair = pairs[i]
        s, t = images[pair["src"]], images[pair["trg"]]
        src, trg = pool(pair["src"], s["grid"]), pool(pair["trg"], t["grid"])
        width = t["size"][0]
        with Clock() as clock:
            prediction = to_xy(naive_scores(src, s["size"], trg, t["size"], pair["kps"]).argmax(dim=1).numpy(), width)
        naive_cpu += clock.cpu
        with Clock() as clock:
            fresh_prediction = fresh_matcher.match(src, s["size"], trg, t["size"], pair["kps"])
        fresh_cpu += clock.cpu
        referee = referee_scores(src, s["size"], trg, t["size"], pair["kps"])
        naive.add(prediction, referee, width)
        fresh.add(fresh_prediction, referee, width)
        fast_on_sample.add(fast_predictions[i], referee, width)
        full64 = naive_scores(src, s["size"], trg, t["size"], pair["kps"], dtype=torch.float64)
        referee_vs_full.add(to_xy(full64.argmax(dim=1).numpy(), width), referee, width)
    n = len(indices)
    return {"naive_cpu_s_per_pair": naive_cpu / n, "fast_fresh_cpu_ms_per_pair": 1000 * fresh_cpu / n,
            "naive": naive, "fast_fresh": fresh, "fast_cached": fast_on_sample, "referee_vs_float64_full": referee_vs_full}


def time_scoring(images, pairs):
    rng = np.random.default_rng(1)
    records, predictions = [], []
    for i, pair in enumerate(pairs):
        t = images[pair["trg"]]
        records.append(Pair(str(i), f"c{t['category']}", "s", t["key"], pair["kps"], pair["truth"], images[pair["src"]]["size"], t["size"], 200.0))
        predictions.append(pair["truth"] + rng.normal(0, 25, pair["truth"].shape))
    with Clock() as clock:
        result = pck(predictions, records)
    return clock, result


def time_nn_cpu(repeats: int) -> dict:
    """Plain cosine NN as in the geoaware hard argmax: 10 queries vs 3600 x 3072, CPU (torch
    alone where faiss is not installed, as in the GPU machine's image)."""
    try:
        import faiss
    except ImportError:
        faiss = None

    g = torch.Generator().manual_seed(2)
    database = F.normalize(torch.randn(3600, CHANNELS, generator=g), dim=1)
    queries = F.normalize(torch.randn(10, CHANNELS, generator=g), dim=1)
    out, results = {}, {}
    for backend in ("torch", "faiss") if faiss is not None else ("torch",):
        nearest_neighbours(queries, database, backend)
        with Clock() as clock:
            for _ in range(repeats):
                results[backend] = nearest_neighbours(queries, database, backend)
        out[f"{backend}_cpu_ms"] = 1000 * clock.cpu / repeats
    if faiss is None:
        out["faiss"] = "not installed"
        return out
    index = faiss.IndexFlatIP(CHANNELS)
    with Clock() as clock:
        for _ in range(repeats):
            index.reset()
            index.add(database.numpy())
            index.search(queries.numpy(), 1)
    out["faiss_IndexFlatIP_add_search_cpu_ms"] = 1000 * clock.cpu / repeats
    out["identical"] = bool(torch.equal(results["torch"], results["faiss"]))
    return out


def time_geoaware(images, pairs, pool, n_pairs) -> float:
    matcher = GeoAwareMatcher()
    with Clock() as clock:
        for pair in pairs[:n_pairs]:
            s, t = images[pair["src"]], images[pair["trg"]]
            matcher.match(pool(pair["src"], s["grid"]), s["size"], pool(pair["trg"], t["grid"]), t["size"], pair["kps"], trg_key=t["key"])
    return 1000 * clock.cpu / n_pairs


# ---- GPU --------------------------------------------------------------------------------------
def _gpu_time(fn, repeats: int) -> float:
    """Milliseconds per call on the GPU (wall clock around `repeats` calls after a warm-up call,
    synchronised at both ends; runs under `fake_cuda` too, where no CUDA events exist)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def time_gpu(images, pairs, n_pairs: int, pool_size: int, device: str,
             cpu_predictions: list[np.ndarray] | None = None, repeats: int = 20) -> dict:
    """FAISS-GPU against torch on the GPU for the searches `auto` may hand to FAISS, and the fast
    matcher with the pairs of each 256-pair block batched by target (data on the device)."""
    g = torch.Generator().manual_seed(5)
    out: dict = {"device": torch.cuda.get_device_name(device), "faiss_gpus": faiss_gpus()}

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, CHANNELS, generator=g), dim=1).to(device)

    searches = {"geoaware_grid_10x3600": (unit(10), unit(3600)), "dense_3600x3600": (unit(3600), unit(3600))}
    for name, (q, b) in searches.items():
        row = {"torch_ms": _gpu_time(lambda q=q, b=b: nearest_neighbours(q, b, "torch"), repeats)}
        if out["faiss_gpus"]:
            row["faiss_gpu_ms"] = _gpu_time(lambda q=q, b=b: faiss_gpu_search(q, b), repeats)
            row["identical"] = bool(torch.equal(nearest_neighbours(q, b, "torch"), faiss_gpu_search(q, b)[:, 0]))
        out[name] = row
    a, b = unit(1000), unit(1000)
    row = {"torch_ms": _gpu_time(lambda: mutual_nearest_neighbours(a, b, "torch"), repeats)}
    if out["faiss_gpus"]:
        row["faiss_gpu_ms"] = _gpu_time(lambda: mutual_nearest_neighbours(a, b, "faiss"), repeats)
    out["hpatches_mnn_1000x1000"] = row

    pool = FeaturePool(pool_size, device=device)
    matcher = DiftMatcher()

    def run_pairs(indices) -> dict[int, np.ndarray]:
        out_pairs: dict[int, np.ndarray] = {}
        for block_start in range(0, len(indices), 256):
            groups: dict = {}
            for i in indices[block_start : block_start + 256]:
                groups.setdefault(pairs[i]["trg"], []).append(i)
            for trg, members in groups.items():
                t = images[trg]
                sources = [(pool(pairs[i]["src"], images[pairs[i]["src"]]["grid"]), images[pairs[i]["src"]]["size"],
                            pairs[i]["kps"]) for i in members]
                for i, xy in zip(members, matcher.match_batch(pool(trg, t["grid"]), t["size"], sources, trg_key=t["key"])):
                    out_pairs[i] = xy
        return out_pairs

    # warm-up: kernels, allocator and the per-target norm cache of the pairs timed below, on
    # pairs after the timed ones (a GPU figure without one times CUDA's start-up)
    warm = list(range(n_pairs, min(N_PAIRS, n_pairs + min(n_pairs, 256)))) or list(range(min(n_pairs, 256)))
    run_pairs(warm)
    matcher.clear_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    predicted = run_pairs(list(range(n_pairs)))
    torch.cuda.synchronize()
    out["fast_batched_ms_per_pair"] = 1000 * (time.perf_counter() - start) / n_pairs
    out["fast_batched_pairs"] = n_pairs
    out["warm_up_pairs"] = len(warm)
    if cpu_predictions is not None:  # the same pairs on the CPU (`run_fast`): CUDA vs CPU agreement
        same = [np.array_equal(predicted[i], cpu_predictions[i]) for i in range(min(n_pairs, len(cpu_predictions)))]
        points = [(predicted[i] == cpu_predictions[i]).all(axis=1) for i in range(len(same))]
        out["cuda_vs_cpu_pairs_identical"] = float(np.mean(same))
        out["cuda_vs_cpu_keypoints_identical"] = float(np.concatenate(points).mean())
    return out


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=N_PAIRS, help="pairs run through the fast matcher AND the referee")
    parser.add_argument("--naive-pairs", type=int, default=20, help="pairs run through the naive reference")
    parser.add_argument("--pool", type=int, default=8, help="distinct random maps per grid shape")
    parser.add_argument("--no-referee", action="store_true", help="skip the referee over the fast workload")
    parser.add_argument("--device", default="cpu", help="cuda: also the GPU section (FAISS-GPU vs torch, batched matcher)")
    parser.add_argument("--fake-cuda", action="store_true",
                        help="with --device cuda: run the GPU section on the CPU's stand-in cuda device (dry runs)")
    parser.add_argument("--quick", action="store_true", help="a few-minute run: 600 fast pairs, 4 naive pairs")
    parser.add_argument("--smoke", action="store_true", help="CI check that the benchmark runs (~20 s): 10 pairs, 1 naive")
    parser.add_argument("--machine", default=None, help="machine description recorded in the JSON")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.pairs, args.naive_pairs, args.pool = True, min(args.pairs, 10), 1, min(args.pool, 2)
    if args.quick:
        args.pairs, args.naive_pairs, args.pool = min(args.pairs, 600), min(args.naive_pairs, 4), min(args.pool, 4)
    args.pairs = max(1, min(args.pairs, N_PAIRS))
    args.naive_pairs = max(1, min(args.naive_pairs, args.pairs))

    torch.set_num_threads(1)  # CPU per pair single-threaded (the match stage's workers run so)
    print(f"torch {torch.__version__}, 1 intra-op thread; CPU times are process_time")
    images, pairs = build_workload()
    pool = FeaturePool(args.pool)
    n_kps = sum(len(p["kps"]) for p in pairs[: args.pairs])
    print(f"workload: {args.pairs} of {N_PAIRS} pairs ({n_kps} keypoints), {N_IMAGES} images, {CHANNELS} channels, float16 maps")

    clock, predictions, targets, fast_agreement = run_fast(images, pairs, pool, args.pairs, not args.no_referee)
    fast_ms = 1000 * clock.cpu / args.pairs
    print(f"fast dift matcher: {args.pairs} pairs ({targets} target norm maps): {fast_ms:.2f} ms CPU/pair, "
          f"{1000 * clock.wall / args.pairs:.2f} ms wall/pair; all {N_PAIRS} pairs: {fast_ms * N_PAIRS / 60000:.1f} CPU-min"
          f" ({'measured' if args.pairs == N_PAIRS else 'extrapolated'})")
    if not args.no_referee:
        print(f"  fast vs float64 referee, every pair: {fast_agreement.line()}")

    sample = np.linspace(0, args.pairs - 1, args.naive_pairs).round().astype(int)
    naive = run_naive(images, pairs, pool, sample, predictions)
    naive_ms = 1000 * naive["naive_cpu_s_per_pair"]
    print(f"naive reference (source at keypoints, target upsampled in full): {len(sample)} pairs, {naive_ms:.0f} ms CPU/pair")
    print(f"  fast with fresh targets (no norm cache) on the same pairs: {naive['fast_fresh_cpu_ms_per_pair']:.2f} ms CPU/pair")
    print(f"  speed ratio naive / fast: {naive_ms / naive['fast_fresh_cpu_ms_per_pair']:.0f}x with fresh targets, "
          f"{naive_ms / fast_ms:.0f}x with SPair-like target reuse")
    for name in ("naive", "fast_fresh", "fast_cached", "referee_vs_float64_full"):
        print(f"  {name} vs referee on the sample: {naive[name].line()}")

    score_clock, result = time_scoring(images, pairs)
    print(f"scoring {result['n_pairs']} pairs / {result['n_points']} points: {score_clock.cpu:.2f} s CPU")

    nn = time_nn_cpu(10 if args.quick else 30)
    faiss_part = (f"faiss.knn {nn['faiss_cpu_ms']:.2f} ms, IndexFlatIP add+search {nn['faiss_IndexFlatIP_add_search_cpu_ms']:.2f} ms "
                  f"(CPU time); identical: {nn['identical']}") if "faiss_cpu_ms" in nn else "faiss not installed"
    print(f"geoaware NN, 10 queries vs 3600 x {CHANNELS}, CPU: torch matmul {nn['torch_cpu_ms']:.2f} ms, {faiss_part}")
    geo_pairs = min(args.pairs, 20 if args.quick else 200)
    geo_ms = time_geoaware(images, pairs, pool, geo_pairs)
    print(f"geoaware matcher (hard): {geo_ms:.1f} ms CPU/pair over {geo_pairs} pairs")

    gpu = None
    if args.device.startswith("cuda"):
        fake = contextlib.nullcontext()
        if args.fake_cuda:
            from ditf_pipeline.fake_cuda import fake_cuda

            fake = fake_cuda()
        elif not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no GPU")
        with fake:
            gpu = time_gpu(images, pairs, args.pairs, args.pool, args.device, predictions, 1 if args.smoke else 20)
        print(f"GPU ({gpu['device']}, faiss GPUs: {gpu['faiss_gpus']}): " + json.dumps({k: v for k, v in gpu.items() if isinstance(v, dict)}))
        print(f"  fast matcher, pairs batched by target: {gpu['fast_batched_ms_per_pair']:.3f} ms wall/pair after "
              f"{gpu['warm_up_pairs']} warm-up pairs; keypoints as on the CPU: {gpu.get('cuda_vs_cpu_keypoints_identical')}")
    else:
        print("GPU: not measured (run with --device cuda on a GPU machine)")

    figures = {
        "machine": args.machine or f"{platform.machine()} CPU, {torch.get_num_interop_threads()} interop threads",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "intra_op_threads": 1,
        "workload": {"pairs": args.pairs, "of_pairs": N_PAIRS, "images": N_IMAGES, "channels": CHANNELS, "keypoints": n_kps,
                     "maps": "float16, smooth random", "naive_pairs": int(len(sample))},
        "fast_cpu_ms_per_pair": fast_ms,
        "fast_wall_ms_per_pair": 1000 * clock.wall / args.pairs,
        "fast_target_norm_maps": targets,
        "fast_vs_referee_every_pair": fast_agreement.as_dict() if not args.no_referee else None,
        "naive_cpu_ms_per_pair": naive_ms,
        "fast_fresh_cpu_ms_per_pair": naive["fast_fresh_cpu_ms_per_pair"],
        "speed_ratio_fresh_targets": naive_ms / naive["fast_fresh_cpu_ms_per_pair"],
        "speed_ratio_target_reuse": naive_ms / fast_ms,
        "sample_vs_referee": {name: naive[name].as_dict() for name in ("naive", "fast_fresh", "fast_cached", "referee_vs_float64_full")},
        "scoring_cpu_s": score_clock.cpu,
        "nn_cpu": nn,
        "geoaware_cpu_ms_per_pair": geo_ms,
        "gpu": gpu if gpu is not None else "not measured",
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_at_end": list(os.getloadavg()),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
