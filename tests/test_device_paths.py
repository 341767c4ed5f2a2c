"""Every GPU code path of the match stage, run on the CPU under `fake_cuda()` (a CPU-backed
stand-in "cuda:0" that refuses what CUDA refuses: `.numpy()` / `np.asarray` on a device tensor,
operations mixing device and host tensors). Each path must run and give the CPU's predictions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditf_pipeline.datasets.base import Pair
from ditf_pipeline.fake_cuda import FakeCudaTensor, fake_cuda
from ditf_pipeline.match.predict import MatchSettings, predict
from ditf_pipeline.store.feature_store import FeatureStore

D, D_PARTNER = 32, 16
SHAPES = [((6, 8), (64, 48)), ((8, 6), (48, 64)), ((6, 8), (64, 43))]
VECTORS = ["shift", "scale", "gate"]


class Pairs:
    """Just what `predict` reads from a dataset."""

    task, name, root, split = "pairs", "spair", "synthetic", "test"

    def __init__(self, n_images: int = 8, n_pairs: int = 24, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = [(f"c{i % 2}/img{i}", *SHAPES[i % len(SHAPES)]) for i in range(n_images)]
        self._pairs = []
        for p in range(n_pairs):
            src, trg = rng.choice(n_images, 2, replace=False)
            (skey, _, ssize), (tkey, _, tsize) = self.images[src], self.images[trg]
            n = int(rng.integers(3, 7))
            kps = np.stack([rng.integers(0, ssize[0], n), rng.integers(0, ssize[1], n)], 1).astype(float)
            truth = np.stack([rng.integers(0, tsize[0], n), rng.integers(0, tsize[1], n)], 1).astype(float)
            self._pairs.append(Pair(f"{p:04d}", "c", skey, tkey, kps, truth, ssize, tsize, 40.0))

    def pairs(self):
        return self._pairs


def _bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).float().numpy()


def build(tmp_path, precision: str | None = None) -> tuple[FeatureStore, Pairs]:
    data = Pairs()
    store = FeatureStore(tmp_path / "s.zarr")
    rows = store.register_images(data.name, [key for key, _, _ in data.images], [size for _, _, size in data.images])
    config = {"model": "synthetic", **({"precision": precision} if precision else {})}
    dit = store.open_features(data.name, "synthetic", 2, 260, config=config, n_images=len(rows), grid_max=(8, 8),
                              hidden_size=D)
    partner = store.open_features(data.name, "partner", 0, 0, config={"model": "partner"}, n_images=len(rows),
                                  grid_max=(12, 12), hidden_size=D_PARTNER, adaln=False)
    rng = np.random.default_rng(1)
    for key, grid, _ in data.images:
        z = rng.standard_normal((*grid, D), dtype=np.float32)
        vectors = {name: (0.1 * rng.standard_normal(D)).astype(np.float32) for name in VECTORS}
        if precision == "paper":
            z, vectors = _bf16(z), {name: _bf16(v) for name, v in vectors.items()}
        dit.write_image(rows[key], z.astype(np.float16), vectors)
        partner.write_image(rows[key], rng.standard_normal((grid[0] + 2, grid[1] + 2, D_PARTNER), dtype=np.float32)
                            .astype(np.float16), {})
    return store, data


def run(store, data, device: str, **settings) -> np.ndarray:
    settings = MatchSettings(device=device, jobs=1, **settings)
    predict(store, data, "synthetic", 2, 260, settings, overwrite=True, progress=False)
    return _read(store, data, settings.name)


def _read(store, data, name: str) -> np.ndarray:
    values = store.open_predictions((data.name, "synthetic", 2, 260), name).read()
    return np.concatenate([values[p.pair_id] for p in data.pairs()])


def on_both(store, data, **settings) -> tuple[np.ndarray, np.ndarray]:
    cpu = run(store, data, "cpu", **settings)
    with fake_cuda():
        gpu = run(store, data, "cuda", **settings)
    return cpu, gpu


def test_fake_cuda_refuses_what_cuda_refuses():
    with fake_cuda() as fake:
        x = torch.ones(2, 3).to("cuda")
        assert isinstance(x, FakeCudaTensor) and x.is_cuda and str(x.device) == "cuda:0"
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(x)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([x, torch.ones(2, 3)])
        with pytest.raises(RuntimeError, match="same device"):
            x @ torch.ones(3, 2)
        assert (x * torch.tensor(2.0)).is_cuda  # host scalars are allowed, as on CUDA
        assert x[torch.tensor([1])].is_cuda  # host index tensors too
        host = (x + 1).cpu().numpy()
        assert host.tolist() == [[2.0] * 3] * 2 and (fake.uploads, fake.downloads) == (1, 1)
        assert torch.zeros(2, device=x.device).is_cuda and torch.cuda.is_available()


def _cosines_at(store, data, variant: str, picks: np.ndarray) -> np.ndarray:
    """The float64 cosine (upsampled maps, the `dift` rule) at each picked target pixel."""
    import torch.nn.functional as F

    from ditf_pipeline.match.features import VECTORS_USED, compute_feature

    arrays = store.open_features(data.name, "synthetic", 2, 260)
    rows = store.image_rows(data.name)

    def upsampled(key: str, size) -> torch.Tensor:
        z, vectors = arrays.read_image(rows[key], vectors=VECTORS_USED[variant])
        grid = compute_feature(variant, z, vectors, [3]).double().permute(2, 0, 1)[None]
        return F.interpolate(grid, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]

    out, start = [], 0
    for pair in data.pairs():
        src, trg = upsampled(pair.src_key, pair.src_size), upsampled(pair.trg_key, pair.trg_size)
        for (x, y), (px, py) in zip(pair.src_kps.astype(int), picks[start:start + len(pair.src_kps)].astype(int)):
            s, t = src[:, y, x], trg[:, py, px]
            out.append(float(s @ t / (s.norm() * t.norm())))
        start += len(pair.src_kps)
    return np.array(out)


@pytest.mark.parametrize("variant", ["raw", "adaln+cd"])
def test_dift_on_the_device_predicts_as_the_cpu(tmp_path, variant):
    store, data = build(tmp_path)
    cpu, gpu = on_both(store, data, variant=variant, channels="3")
    # two float32 implementations of one rule (the CPU's compiled loop, torch's kernels on the
    # device, which also batches its matmul by target): they may only part where scores tie to
    # float32 rounding, as along an image border past the last cell centre, where a strip of
    # pixels has one exact score
    same = (cpu == gpu).all(axis=-1)
    assert same.mean() > 0.85
    if not same.all():
        gap = np.abs(_cosines_at(store, data, variant, cpu) - _cosines_at(store, data, variant, gpu))
        assert (gap[~same] < 1e-5).all(), gap[~same]


def test_paper_precision_on_the_device(tmp_path):
    cpu, gpu = on_both(*build(tmp_path, precision="paper"), variant="adaln+cd", channels="3")
    assert (cpu == gpu).all()


def test_fuse_on_the_device(tmp_path, monkeypatch):
    # this checks where fusion's tensors live; the CPU side takes torch's kernels as the device
    # does (the compiled CPU loop's own agreement is `test_dift_on_the_device_predicts_as_the_cpu`)
    from ditf_pipeline.match import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    cpu, gpu = on_both(*build(tmp_path), variant="raw", fuse="partner/k0/t0", pca_dim=8)
    assert (cpu == gpu).all(axis=-1).mean() > 0.97


@pytest.mark.parametrize("soft_window", [None, 15])
def test_geoaware_on_the_device(tmp_path, soft_window):
    cpu, gpu = on_both(*build(tmp_path), variant="raw", protocol="geoaware", soft_window=soft_window)
    np.testing.assert_allclose(cpu, gpu, atol=1e-3)


def test_davis_propagation_on_the_device(tmp_path):
    from PIL import Image

    from ditf_pipeline.match.video import propagate_sequence

    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((6, 8, D)).astype(np.float16) for _ in range(4)]
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 20:40] = 1
    palette = np.zeros((256, 3), dtype=np.uint8)
    names = [f"{i:05d}" for i in range(4)]
    cpu = propagate_sequence(lambda i: frames[i], mask, names, tmp_path / "cpu", palette, device="cpu")
    with fake_cuda():
        gpu = propagate_sequence(lambda i: torch.from_numpy(frames[i]).to("cuda"), mask, names, tmp_path / "gpu",
                                 palette, device="cuda")
    for a, b in zip(cpu, gpu):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_hpatches_matching_on_the_device():
    from ditf_pipeline.match.homography import match_pair

    rng = np.random.default_rng(0)
    fa, fb = (rng.standard_normal((8, 8, D)).astype(np.float32) for _ in range(2))
    kps = rng.uniform(0, 63, size=(40, 2))
    cpu = match_pair(fa, fb, kps, kps, (64, 64), (64, 64), H_gt=np.eye(3))
    with fake_cuda():
        gpu = match_pair(torch.from_numpy(fa).to("cuda"), fb, kps, kps, (64, 64), (64, 64), H_gt=np.eye(3),
                         device="cuda")
    assert gpu.n_matches == cpu.n_matches


def test_the_gpu_pair_loop_waits_for_the_device_once_per_block(tmp_path, monkeypatch):
    """Keypoints go up once per source (both coordinates in one copy), each image's map once per
    run (the device's cache budget holds them all), and results come back once per block."""
    import ditf_pipeline.match.predict as predict_module

    store, data = build(tmp_path)
    monkeypatch.setattr(predict_module, "BLOCK", 8)
    n_blocks = -(-len(data.pairs()) // 8)
    with fake_cuda() as fake:
        run(store, data, "cuda", variant="adaln+cd", channels="3")
    downloads = {where: n for where, n in fake.downloads_by.items() if where.startswith(("predict.py", "matchers.py", "taps.py"))}
    assert downloads == {"predict.py:match_pairs": n_blocks}, fake.downloads_by
    assert fake.uploads_by["taps.py:upsampled_vectors"] == len(data.pairs())
    assert fake.uploads_by["predict.py:_to_device"] == len(data.images) * 3  # z, shift and scale of each image, once
