"""Click latency of `ditf view` at SPair size, from the cache.

Workload: a generated SPair-layout pair with images of ~500 px (450..550 x 338..413), one
Flux-sized key (40 x 40 tokens x 3072 channels, float16, massive channels injected, random
AdaLN vectors) and the three ablation variants (raw, adaln, adaln+cd) shown side by side, as
the page asks by default. Measured through the HTTP API (FastAPI's TestClient: routing, JSON
validation and the JSON answer with three 40 x 40 heatmaps included; the browser's own
network hop on 127.0.0.1 is not):

* opening the pair (reads both images' features, computes the variants, warms the matcher);
* a click on an arbitrary pixel (3 variants) and on an annotated keypoint, median / p95 / max
  over `--clicks` clicks at random points, with torch on `--threads` threads (`ditf view`
  uses 1).

    python benchmarks/bench_view.py [--clicks N] [--threads T] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from ditf_pipeline.datasets import get_dataset  # noqa: E402
from ditf_pipeline.demo import make_spair_demo  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402
from ditf_pipeline.view.app import create_app  # noqa: E402
from ditf_pipeline.view.explorer import Explorer  # noqa: E402

GRID, CHANNELS, MASSIVE = (40, 40), 3072, (154, 1446)
KEY = {"dataset": "spair", "model": "flux", "k": 28, "t": 260}
VARIANTS = ["raw", "adaln", "adaln+cd"]


def build(folder: Path) -> tuple[Path, Path]:
    root = make_spair_demo(folder / "SPair", categories=("cat",), pairs_per_category=1, image_size=(500, 375))
    records = get_dataset("spair", root).images()
    from PIL import Image

    store = FeatureStore(folder / "view.zarr")
    rows = store.register_images("spair", [r.key for r in records], [Image.open(r.path).size for r in records])
    arrays = store.open_features("spair", "flux", 28, 260, config={"synthetic": True}, n_images=len(records),
                                 grid_max=GRID, hidden_size=CHANNELS)
    rng = np.random.default_rng(0)
    for r in records:
        z = rng.normal(0, 1, size=(*GRID, CHANNELS)).astype(np.float32)
        z[..., list(MASSIVE)] = 2000.0
        arrays.write_image(rows[r.key], z.astype(np.float16),
                           {name: rng.normal(0, 0.1, CHANNELS) for name in ("shift", "scale", "gate")})
    arrays.set_massive_channels(MASSIVE)
    return root, folder / "view.zarr"


def stats(values: list[float]) -> dict:
    ms = np.asarray(values) * 1000
    return {"median_ms": round(float(np.median(ms)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-view-") as folder:
        root, store = build(Path(folder))
        app = create_app(Explorer(store, root))  # as the page talks to it: a loopback Host, the run's token
        client = TestClient(app, base_url="http://127.0.0.1:8765", headers={"X-Ditf-Token": app.state.token})
        pair = client.get("/api/pairs", params=KEY).json()["pairs"][0]["pair_id"]
        start = time.perf_counter()
        opened = client.get("/api/pair", params={**KEY, "pair_id": pair, "variants": ",".join(VARIANTS)})
        open_s = time.perf_counter() - start
        assert opened.status_code == 200, opened.text
        width, height = opened.json()["src"]["size"]
        n_kps = len(opened.json()["src_kps"])
        rng = np.random.default_rng(1)
        points, keypoints = [], []
        for i in range(args.clicks):
            body = {**KEY, "pair_id": pair, "variants": VARIANTS, "x": int(rng.integers(width)), "y": int(rng.integers(height))}
            start = time.perf_counter()
            answer = client.post("/api/click", json=body)
            points.append(time.perf_counter() - start)
            assert answer.status_code == 200, answer.text
            start = time.perf_counter()
            answer = client.post("/api/click", json={**KEY, "pair_id": pair, "variants": VARIANTS, "keypoint": i % n_kps})
            keypoints.append(time.perf_counter() - start)
            assert answer.status_code == 200, answer.text
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
        "date": time.strftime("%Y-%m-%d"),
        "workload": f"{GRID[0]}x{GRID[1]}x{CHANNELS} fp16 features, images {width}x{height}, variants {', '.join(VARIANTS)}",
        "open_pair_s": round(open_s, 2),
        "click_point": stats(points),
        "click_keypoint": stats(keypoints),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
