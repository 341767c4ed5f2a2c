"""Reading a published store over HTTP against reading it from the local disk.

Workload: a Flux-sized key (`--images` images of 40 x 40 tokens x 3072 channels, float16, with
shift/scale vectors; random values, so the chunks barely compress), written through
`FeatureStore`, packed with `ditf pack`'s code and served by the standard library's HTTP server
on 127.0.0.1 (tests/_http_server.py: files only, ranges answered). Measured, each as the median of
`--repeats` runs of reading every image (`read_image`, all vectors):

* the local packed store (the baseline);
* the same store over http:// (every chunk fetched: the network hop on loopback, HTTP parsing,
  the server's file reads);
* over simplecache::http:// cold (fetched and kept) and warm (served from the cache).

Also the requests that opening costs (one: the root zarr.json). Loopback only: a real server's
latency and bandwidth are not measured here.

    python benchmarks/bench_published.py [--images N] [--repeats R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _http_server import serve  # noqa: E402

from ditf_pipeline.pipeline import run_pack  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402


def build(path: Path, images: int) -> None:
    """A Flux-sized key of random features, committed image by image."""
    rng = np.random.default_rng(0)
    with FeatureStore(path) as store:
        keys = [f"cat/img_{i:04d}" for i in range(images)]
        rows = store.register_images("spair", keys, [(640, 640)] * images)
        arrays = store.open_features("spair", "flux", 28, 260, config={"model": "flux", "bench": True}, n_images=images,
                                     grid_max=(40, 40), hidden_size=3072, modulation_names=(), adaln=True)
        for key in keys:
            features = rng.standard_normal((40, 40, 3072)).astype(np.float16)
            vectors = {name: rng.standard_normal(3072).astype(np.float32) for name in ("shift", "scale", "gate")}
            arrays.write_image(rows[key], features, vectors)


def read_all(url: str) -> float:
    """Seconds to open the store and read every image of its key."""
    start = time.perf_counter()
    arrays = FeatureStore(url, read_only=True).open_features("spair", "flux", 28, 260)
    for row in range(arrays.n_images):
        arrays.read_image(row)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "source.zarr", args.images)
        manifest = run_pack(store=tmp / "source.zarr", out=tmp / "packed")
        local = str(tmp / "packed" / "ditf.zarr")
        import fsspec.config

        fsspec.config.conf["simplecache"] = {"cache_storage": str(tmp / "cache")}
        with serve(tmp / "packed") as (base, requests):
            url = f"{base}/ditf.zarr"
            FeatureStore(url, read_only=True)
            open_requests = len(requests)
            times = {
                "local": [read_all(local) for _ in range(args.repeats)],
                "http": [read_all(url) for _ in range(args.repeats)],
                "simplecache_cold": [read_all(f"simplecache::{url}")],
                "simplecache_warm": [read_all(f"simplecache::{url}") for _ in range(args.repeats)],
            }
    median = {name: statistics.median(values) for name, values in times.items()}
    mb = manifest["bytes"] / 1e6
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "images": args.images,
              "store_mb": round(mb, 1), "open_requests": open_requests,
              "seconds": {name: round(value, 3) for name, value in median.items()},
              "ratio_to_local": {name: round(value / median["local"], 2) for name, value in median.items()}}
    print(f"RESULT open: {open_requests} request(s)")
    for name, value in median.items():
        print(f"RESULT {name}: {value:.3f} s for {args.images} images ({mb / value:.0f} MB/s), "
              f"{value / median['local']:.2f} x local")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
