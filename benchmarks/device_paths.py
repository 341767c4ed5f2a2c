"""Every former CUDA-only crash point of the match stage, run on the GPU against the CPU.

    python benchmarks/device_paths.py --json OUT.json [--fake-cuda]

Paths: `predict` with ``dift`` (pairs batched by target), ``--precision paper`` keys (their
fp16 arithmetic: `np.asarray` / `.numpy()` on device tensors crashed), ``--fuse`` (the
partner's cache was on the CPU while the DiT's was on the GPU), ``geoaware`` (hard and window
soft-argmax), DAVIS propagation and HPatches' mutual nearest neighbours. Each runs on a small
synthetic store (random features in the real on-disk format) on ``cuda`` and on ``cpu``; the
JSON says per path whether it ran and how many keypoints (or masks, or matches) agree.
`--fake-cuda` runs the ``cuda`` side on the CPU's stand-in device (`ditf_pipeline.fake_cuda`),
which refuses what CUDA refuses: the dry run of `gpu_check.sh`. tests/test_device_paths.py
checks the same paths in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditf_pipeline.datasets.base import Pair  # noqa: E402
from ditf_pipeline.match.predict import MatchSettings, predict  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402

D, D_PARTNER = 64, 32
SHAPES = [((30, 40), (500, 375)), ((40, 30), (375, 500)), ((30, 40), (500, 333))]
#: --tiny (the dry run in the suite): toy grids and widths, the same code paths
TINY_SHAPES = [((6, 8), (64, 48)), ((8, 6), (48, 64)), ((6, 8), (64, 43))]


class Pairs:
    """Just what `predict` reads from a dataset."""

    task, name, root, split = "pairs", "spair", "synthetic", "test"

    def __init__(self, n_images: int = 12, n_pairs: int = 64, seed: int = 0) -> None:
        n_images, n_pairs = (8, 24) if SHAPES == TINY_SHAPES else (n_images, n_pairs)
        rng = np.random.default_rng(seed)
        self.images = [(f"c{i % 2}/img{i}", *SHAPES[i % len(SHAPES)]) for i in range(n_images)]
        self._pairs = []
        for p in range(n_pairs):
            src, trg = rng.choice(n_images, 2, replace=False)
            (skey, _, ssize), (tkey, _, tsize) = self.images[src], self.images[trg]
            n = int(rng.integers(6, 15))
            kps = np.stack([rng.integers(0, ssize[0], n), rng.integers(0, ssize[1], n)], 1).astype(float)
            self._pairs.append(Pair(f"{p:04d}", "c", skey, tkey, kps, kps.copy(), ssize, tsize, 100.0))

    def pairs(self):
        return self._pairs


def _bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).float().numpy()


def build(path: Path, precision: str | None = None) -> tuple[FeatureStore, Pairs]:
    data = Pairs()
    store = FeatureStore(path)
    rows = store.register_images(data.name, [key for key, _, _ in data.images], [size for _, _, size in data.images])
    config = {"model": "synthetic", **({"precision": precision} if precision else {})}
    dit = store.open_features(data.name, "synthetic", 2, 260, config=config, n_images=len(rows), grid_max=(max(g[0] for g, _ in SHAPES), max(g[1] for g, _ in SHAPES)),
                              hidden_size=D)
    partner = store.open_features(data.name, "partner", 0, 0, config={"model": "partner"}, n_images=len(rows),
                                  grid_max=(max(g[0] for g, _ in SHAPES) + 5, max(g[1] for g, _ in SHAPES) + 5),
                                  hidden_size=D_PARTNER, adaln=False)
    rng = np.random.default_rng(1)
    for key, grid, _ in data.images:
        z = rng.standard_normal((*grid, D), dtype=np.float32)
        vectors = {name: (0.1 * rng.standard_normal(D)).astype(np.float32) for name in ("shift", "scale", "gate")}
        if precision == "paper":
            z, vectors = _bf16(z), {name: _bf16(v) for name, v in vectors.items()}
        dit.write_image(rows[key], z.astype(np.float16), vectors)
        partner.write_image(rows[key], rng.standard_normal((grid[0] + 5, grid[1] + 5, D_PARTNER), dtype=np.float32)
                            .astype(np.float16), {})
    return store, data


def _predictions(store, data, device: str, **settings) -> np.ndarray:
    settings = MatchSettings(device=device, jobs=1, **settings)
    predict(store, data, "synthetic", 2, 260, settings, overwrite=True, progress=False)
    values = store.open_predictions((data.name, "synthetic", 2, 260), settings.name).read()
    return np.concatenate([values[p.pair_id] for p in data.pairs()])


def _pair_path(tmp: Path, device_context, precision: str | None = None, **settings):
    def run() -> dict:
        store, data = build(tmp / f"{precision}-{len(list(tmp.iterdir()))}.zarr", precision)
        cpu = _predictions(store, data, "cpu", **settings)
        with device_context():
            gpu = _predictions(store, data, "cuda", **settings)
        return {"keypoints": len(cpu), "agree": float((cpu == gpu).all(axis=1).mean()),
                "max_abs_diff_px": float(np.abs(cpu - gpu).max())}

    return run


def _davis(tmp: Path, device_context):
    def run() -> dict:
        from PIL import Image

        from ditf_pipeline.match.video import propagate_sequence

        rng = np.random.default_rng(0)
        frames = [rng.standard_normal((*SHAPES[0][0], D)).astype(np.float16) for _ in range(4)]
        mask = np.zeros((240, 320), dtype=np.uint8)
        mask[40:120, 80:200] = 1
        palette = np.zeros((256, 3), dtype=np.uint8)
        names = [f"{i:05d}" for i in range(4)]
        cpu = propagate_sequence(lambda i: frames[i], mask, names, tmp / "davis-cpu", palette, device="cpu")
        with device_context():
            gpu = propagate_sequence(lambda i: frames[i], mask, names, tmp / "davis-gpu", palette, device="cuda")
        same = [np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(cpu, gpu)]
        return {"masks": len(same), "agree": float(np.mean(same))}

    return run


def _hpatches(device_context):
    def run() -> dict:
        from ditf_pipeline.match.homography import match_pair

        rng = np.random.default_rng(0)
        fa, fb = (rng.standard_normal((*SHAPES[0][0], D)).astype(np.float32) for _ in range(2))
        kps = rng.uniform(0, 479, size=(500, 2))
        cpu = match_pair(fa, fb, kps, kps, (640, 480), (640, 480), H_gt=np.eye(3))
        with device_context():
            gpu = match_pair(fa, fb, kps, kps, (640, 480), (640, 480), H_gt=np.eye(3), device="cuda")
        return {"matches_cpu": cpu.n_matches, "matches_cuda": gpu.n_matches, "agree": float(cpu.n_matches == gpu.n_matches)}

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-cuda", action="store_true", help="the cuda side on the CPU's stand-in device (dry run)")
    parser.add_argument("--tiny", action="store_true", help="toy grids and widths (the suite's dry run)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    global SHAPES, D, D_PARTNER
    if args.tiny:
        SHAPES, D, D_PARTNER = TINY_SHAPES, 32, 16
    if args.fake_cuda:
        from ditf_pipeline.fake_cuda import fake_cuda as device_context
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: torch sees no CUDA GPU here; use --fake-cuda for a dry run")
        device_context = contextlib.nullcontext
    results: dict = {"device": "fake-cuda (CPU)" if args.fake_cuda else torch.cuda.get_device_name(0), "paths": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        paths = {
            "dift": _pair_path(tmp, device_context, variant="adaln+cd", channels="3"),
            "paper_precision": _pair_path(tmp, device_context, "paper", variant="adaln+cd", channels="3"),
            "fuse": _pair_path(tmp, device_context, variant="raw", fuse="partner/k0/t0", pca_dim=8),
            "geoaware": _pair_path(tmp, device_context, variant="raw", protocol="geoaware"),
            "geoaware_soft": _pair_path(tmp, device_context, variant="raw", protocol="geoaware", soft_window=15),
            "davis_propagation": _davis(tmp, device_context),
            "hpatches": _hpatches(device_context),
        }
        for path, run in paths.items():
            try:
                results["paths"][path] = {"ran": True, **run()}
            except Exception as exc:  # a crash point is a result here: record it and go on
                results["paths"][path] = {"ran": False, "error": f"{type(exc).__name__}: {exc}",
                                          "where": traceback.format_exc(limit=-3)}
            row = results["paths"][path]
            print(f"RESULT device path {path}: " + ("ran, agreement " + f"{row['agree']:.4f}" if row["ran"] else row["error"]))
    results["all_ran"] = all(row["ran"] for row in results["paths"].values())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
