"""The match stage end to end (`predict`: store reads, feature variants, caches, worker threads,
prediction writes) on a synthetic SPair-71k-shaped store: CPU per pair, wall clock for 1 and 2
(or more) jobs, peak RSS, for every feature variant.

The store holds `--images` random float16 Flux-sized maps (40x30 / 30x40 x 3072, two massive
channels) with AdaLN vectors; pairs are drawn within 18 categories as in SPair's test split
(12,234 pairs over 481 images at --scale 1). Each (variant, jobs) run is a fresh process, so
its peak RSS is its own; the store is built once and reused (--store).

    python benchmarks/bench_predict.py [--scale 0.25] [--jobs 1,2] [--variants raw,adaln+cd] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_PAIRS, N_IMAGES, N_CATEGORIES, CHANNELS = 12_234, 481, 18, 3072
SHAPES = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((30, 40), (500, 333)), ((40, 30), (333, 500))]
MASSIVE = (154, 1446)
VARIANTS = ["raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c"]


class SyntheticPairs:
    """Just what `predict` reads from a dataset: name, task, root and the pairs."""

    task = "pairs"

    def __init__(self, scale: float, seed: int = 0) -> None:
        from ditf_pipeline.datasets.base import Pair

        self.name, self.root, self.split = "spair", Path("synthetic"), "test"
        rng = np.random.default_rng(seed)
        n_images, n_pairs = max(N_CATEGORIES * 2, round(N_IMAGES * scale)), max(1, round(N_PAIRS * scale))
        self.images = []
        for i in range(n_images):
            grid, size = SHAPES[int(rng.integers(len(SHAPES)))]
            self.images.append({"key": f"c{i * N_CATEGORIES // n_images}/img{i}", "grid": grid, "size": size,
                                "category": i * N_CATEGORIES // n_images})
        by_category = [[i for i, im in enumerate(self.images) if im["category"] == c] for c in range(N_CATEGORIES)]
        self._pairs = []
        for p in range(n_pairs):
            src, trg = rng.choice(by_category[p * N_CATEGORIES // n_pairs], 2, replace=False)
            s, t = self.images[src], self.images[trg]
            n = int(rng.integers(6, 15))
            kps = np.stack([rng.integers(0, s["size"][0], n), rng.integers(0, s["size"][1], n)], 1).astype(float)
            truth = np.stack([rng.integers(0, t["size"][0], n), rng.integers(0, t["size"][1], n)], 1).astype(float)
            self._pairs.append(Pair(f"{p:06d}", f"c{s['category']}", s["key"], t["key"], kps, truth, s["size"], t["size"], 200.0))

    def pairs(self):
        return self._pairs


def build_store(path: Path, data: SyntheticPairs) -> None:
    from ditf_pipeline.store.feature_store import FeatureStore

    store = FeatureStore(path)
    rows = store.register_images(data.name, [im["key"] for im in data.images], [im["size"] for im in data.images])
    arrays = store.open_features(data.name, "synthetic", 28, 260, config={"model": "synthetic"}, n_images=len(rows),
                                 grid_max=(40, 40), hidden_size=CHANNELS,
                                 modulation_names=["shift_t", "scale_t", "gate_t", "shift_c", "scale_c", "gate_c"])
    complete = arrays.complete()
    rng = np.random.default_rng(1)
    for im in data.images:
        row = rows[im["key"]]
        if complete[row]:
            continue
        z = rng.standard_normal((*im["grid"], CHANNELS), dtype=np.float32)
        for channel in MASSIVE:
            z[..., channel] *= 300
        vectors = {name: (0.1 * rng.standard_normal(CHANNELS)).astype(np.float32) for name in arrays.modulation_names}
        arrays.write_image(row, z.astype(np.float16), vectors)


def run_one(store_path: Path, scale: float, variant: str, jobs: int, protocol: str) -> dict:
    """One match run in this process (called in a fresh subprocess by `main`)."""
    from ditf_pipeline.match.predict import MatchSettings, predict
    from ditf_pipeline.store.feature_store import FeatureStore

    data = SyntheticPairs(scale)
    store = FeatureStore(store_path)
    arrays = store.open_features(data.name, "synthetic", 28, 260)
    arrays.group.attrs.pop("massive_channels", None)  # every run detects (and stores) them itself
    settings = MatchSettings(variant=variant, protocol=protocol, jobs=jobs)
    cpu, wall = time.process_time(), time.perf_counter()
    report = predict(store, data, "synthetic", 28, 260, settings, overwrite=True, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"variant": variant, "protocol": protocol, "jobs": jobs, "pairs": report.matched, "channels": report.channels,
            "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_pair": 1000 * cpu / report.matched,
            "wall_ms_per_pair": 1000 * wall / report.matched,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SPair's 481 images / 12,234 pairs")
    parser.add_argument("--jobs", default="1,2", help="comma list of job counts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--protocol", default="dift")
    parser.add_argument("--store", type=Path, default=None, help="store to build/reuse (default: a temporary one)")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", nargs=3, metavar=("STORE", "VARIANT", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RUN " + json.dumps(run_one(Path(args.one[0]), args.scale, args.one[1], int(args.one[2]), args.protocol)))
        return

    data = SyntheticPairs(args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "bench.zarr"
        start = time.perf_counter()
        build_store(store, data)
        print(f"store: {len(data.images)} images, {len(data.pairs())} pairs ({time.perf_counter() - start:.0f} s to build)")
        runs = []
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            for jobs in [int(j) for j in args.jobs.split(",")]:
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                out = subprocess.run([sys.executable, __file__, "--scale", str(args.scale), "--protocol", args.protocol,
                                      "--one", str(store), variant, str(jobs)], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                run = json.loads(out.stdout.split("RUN ", 1)[1])
                runs.append(run)
                print(f"{variant:14s} jobs={jobs}: {run['cpu_ms_per_pair']:.2f} ms CPU/pair, {run['wall_s']:.1f} s wall "
                      f"({run['wall_ms_per_pair']:.2f} ms/pair), peak RSS {run['peak_rss_mib']:.0f} MiB, channels {run['channels']}")
        speedups = {}
        for variant in {r["variant"] for r in runs}:
            by_jobs = {r["jobs"]: r["wall_s"] for r in runs if r["variant"] == variant}
            if 1 in by_jobs and 2 in by_jobs:
                speedups[variant] = by_jobs[1] / by_jobs[2]
                print(f"{variant:14s} wall-clock speed-up 1 -> 2 jobs: {speedups[variant]:.2f}x")
    result = {"machine": args.machine, "date": datetime.date.today().isoformat(), "scale": args.scale,
              "images": len(data.images), "pairs": len(data.pairs()), "protocol": args.protocol, "runs": runs,
              "speedup_1_to_2_jobs": speedups, "load_average_at_end": list(os.getloadavg())}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
