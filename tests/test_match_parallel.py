"""Match on every core and on any device: byte-bounded caches, workers (the same bits as one job),
stored channels, device plumbing (exercised with device="cpu"; no GPU here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from ditf_pipeline.match import predict as predict_module
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match.features import ChannelMeans, detect_massive_channels
from ditf_pipeline.match.homography import _device_matches, mutual_nearest_neighbours as numpy_mnn, sample_descriptors
from ditf_pipeline.core.images import image_size
from ditf_pipeline.match.matchers import (
    ByteLRU,
    DiftMatcher,
    mutual_nearest_neighbours,
    nearest_neighbours,
    resolve_match_device,
)
from ditf_pipeline.match.pool import WorkerPool
from ditf_pipeline.match.predict import MatchSettings, match_pairs, predict, run_blocks
from ditf_pipeline.store.feature_store import FeatureStore

DIM = 24
MASSIVE = {3: 400.0, 17: -300.0}


# --------------------------------------------------------------------------------------------
# ByteLRU
# --------------------------------------------------------------------------------------------


def test_byte_lru_evicts_by_bytes_and_skips_oversized_values():
    cache = ByteLRU(max_bytes=3 * 400)  # three 100-float32 tensors
    for key in "abcd":
        cache.get(key, lambda: torch.zeros(100))
    assert len(cache) == 3 and cache.bytes == 1200 and cache.misses == 4
    cache.get("b", lambda: pytest.fail("b is cached"))
    cache.get("a", lambda: torch.zeros(100))  # a was evicted first (least recently used)
    assert cache.misses == 5 and cache.hits == 1
    big = cache.get("big", lambda: torch.zeros(1000))
    assert big.numel() == 1000 and len(cache) == 3 and cache.bytes <= 1200
    assert ByteLRU(0).get("x", lambda: 1) == 1


def test_byte_lru_computes_a_key_once_across_threads():
    cache = ByteLRU(1 << 20)
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.05)
        return torch.ones(4)

    threads = [threading.Thread(target=cache.get, args=("k", compute)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and cache.hits == 3


# --------------------------------------------------------------------------------------------
# the match stage on worker threads
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """A SPair-layout demo with random float16 features, AdaLN vectors and two massive channels."""
    base = tmp_path_factory.mktemp("parallel")
    root = make_spair_demo(base / "SPair", pairs_per_category=5)
    dataset = get_dataset("spair", root, "test")
    records = dataset.images()
    store = FeatureStore(base / "s.zarr")
    rows = store.register_images("spair", [r.key for r in records], [image_size(r.path) for r in records])
    arrays = store.open_features("spair", "rand", 0, 0, config={"model": "rand"}, n_images=len(rows), grid_max=(12, 12),
                                 hidden_size=DIM)
    rng = np.random.default_rng(0)
    for record in records:
        z = rng.standard_normal((9 + rng.integers(0, 3), 12, DIM)).astype(np.float32)
        for channel, value in MASSIVE.items():
            z[..., channel] = value * (1 + 0.01 * rng.standard_normal(z.shape[:2]))
        vectors = {name: (0.1 * rng.standard_normal(DIM)).astype(np.float32) for name in arrays.modulation_names}
        arrays.write_image(rows[record.key], z.astype(np.float16), vectors)
    return store, dataset, base


def _stored(store, name):
    return store.open_predictions(("spair", "rand", 0, 0), name).read()


def _predict(path, dataset, jobs, **settings):
    with FeatureStore(path) as store:
        settings = MatchSettings(jobs=jobs, **settings)
        predict(store, dataset, "rand", 0, 0, settings, overwrite=True, progress=False)
        return store.open_predictions(("spair", "rand", 0, 0), settings.name).read()


@pytest.mark.parametrize("variant, protocol", [("adaln", "dift"), ("raw", "geoaware")])
def test_workers_give_the_bits_of_one_job(demo_store, monkeypatch, variant, protocol):
    _, dataset, base = demo_store
    path = base / "s.zarr"
    monkeypatch.setattr(predict_module, "BLOCK", 3)
    monkeypatch.setattr(predict_module, "POOL_MIN_PAIRS", 1)
    used = []

    class CountedPool(WorkerPool):
        def run(self, blocks, make_runner):
            used.append((len(blocks), self.jobs))
            return super().run(blocks, make_runner)

    monkeypatch.setattr(predict_module, "WorkerPool", CountedPool)
    one = _predict(path, dataset, 1, variant=variant, protocol=protocol)
    assert not used  # one job: in this process
    for jobs in (2, 3):
        many = _predict(path, dataset, jobs, variant=variant, protocol=protocol)
        assert used[-1] == (-(-len(dataset.pairs()) // 3), jobs)  # the pool ran: blocks, workers
        assert many.keys() == one.keys()
        for pair_id, value in one.items():
            assert np.array_equal(many[pair_id], value), (jobs, pair_id)


def test_a_small_run_stays_in_this_process(demo_store, monkeypatch):
    _, dataset, base = demo_store
    path = base / "s.zarr"
    monkeypatch.setattr(predict_module, "BLOCK", 3)
    monkeypatch.setattr(predict_module, "WorkerPool", lambda *a: pytest.fail("no workers for a few pairs"))
    assert len(dataset.pairs()) < predict_module.POOL_MIN_PAIRS
    assert _predict(path, dataset, 2, variant="raw")


def test_an_error_in_a_worker_is_the_one_line_of_one_job(demo_store, tmp_path, monkeypatch):
    _, dataset, base = demo_store
    path = base / "s.zarr"
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(path, damaged)
    # flip a byte in the features of the image of the last pair: worker 1's span (or a steal) reads it
    key = dataset.pairs()[-1].trg_key
    with FeatureStore(damaged, read_only=True) as store:
        row = store.image_rows("spair")[key]
    chunks = damaged / "spair/rand/k0/t0/pre_adaln/c" / str(row)  # one chunk (file) per image
    chunk = next(p for p in chunks.rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    monkeypatch.setattr(predict_module, "BLOCK", 3)
    monkeypatch.setattr(predict_module, "POOL_MIN_PAIRS", 1)
    messages = []
    for jobs in (1, 2):
        with pytest.raises(DitfError) as caught:
            _predict(damaged, dataset, jobs, variant="adaln")
        messages.append(str(caught.value))
    assert "\n" not in messages[1] and key in messages[1]
    assert messages[1].split(": ", 1)[1] == messages[0].split(": ", 1)[1]  # the same words, after "pair <id>"


def test_matching_runs_with_one_intra_op_thread_and_restores_the_setting():
    seen = []

    def run_block(start):
        seen.append(torch.get_num_threads())
        return [start]

    before = torch.get_num_threads()
    assert [s for s, _ in run_blocks([0, 1, 2, 3], run_block)] == [0, 1, 2, 3] and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_auto_channels_are_detected_once_and_stored_in_the_key(demo_store, monkeypatch):
    store, dataset, _ = demo_store
    arrays = store.open_features("spair", "rand", 0, 0)
    arrays.group.attrs.pop("massive_channels", None)
    report = predict(store, dataset, "rand", 0, 0, MatchSettings(variant="adaln+cd", channels="auto"), overwrite=True,
                     progress=False)
    assert report.channels == sorted(MASSIVE)
    arrays = store.open_features("spair", "rand", 0, 0)
    assert arrays.massive_channels == sorted(MASSIVE)
    assert arrays.group.attrs["massive_channels_info"]["by"] == "ditf match --channels auto"
    # a second run reads the stored set: no image is read to detect channels again
    calls = []
    monkeypatch.setattr(predict_module.ChannelMeans, "add", lambda self, z: calls.append(1))
    again = predict(store, dataset, "rand", 0, 0, MatchSettings(variant="adaln+cd", channels="auto"), progress=False)
    assert again.channels == sorted(MASSIVE) and calls == []


def test_running_channel_mean_equals_the_one_shot_detection():
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((rows, 7, 64)).astype(np.float16) for rows in (5, 6, 9)]
    for image in images:
        image[..., 11] = 500
    means = ChannelMeans(64)
    for image in images:
        means.add(image)
    together = np.concatenate([i.reshape(-1, 64) for i in images])
    assert means.massive() == detect_massive_channels(together) == [11]
    np.testing.assert_allclose(means.means(), np.abs(together.astype(np.float64)).mean(0), rtol=1e-12)


def test_feature_cache_keeps_float16_within_its_byte_budget(demo_store):
    store, dataset, _ = demo_store
    arrays = store.open_features("spair", "rand", 0, 0)
    rows = store.image_rows("spair")
    cache = predict_module.pair_feature_cache(arrays, rows, "adaln", [], "cpu", max_bytes=3 * 12 * 12 * DIM * 2)
    keys = list(rows)[:6]
    for key in keys:
        assert cache(key).dtype == torch.float16
    assert cache._cache.bytes <= 3 * 12 * 12 * DIM * 2 and len(cache._cache) <= 3
    cache(keys[-1])
    assert cache.hits == 1


# --------------------------------------------------------------------------------------------
# device plumbing (device="cpu")
# --------------------------------------------------------------------------------------------


def test_batched_target_matching_equals_pair_by_pair_on_exact_features():
    """Integer features: every dot product is exact, so batching cannot change a bit."""
    g = torch.Generator().manual_seed(0)
    trg = torch.randint(-3, 4, (9, 12, 16), generator=g).float().half()
    sources = []
    for i in range(3):
        src = torch.randint(-3, 4, (10 + i, 12, 16), generator=g).float().half()
        kps = np.stack([np.arange(5) * 20 + i, np.arange(5) * 15], axis=1)
        sources.append((src, (120 + i, 100), kps))
    matcher = DiftMatcher()
    batched = matcher.match_batch(trg, (97, 71), sources, trg_key="t")
    single = [DiftMatcher().match(src, size, trg, (97, 71), kps) for src, size, kps in sources]
    for a, b in zip(batched, single):
        np.testing.assert_array_equal(a, b)


def test_match_pairs_batches_by_target_on_request(demo_store):
    store, dataset, _ = demo_store
    arrays = store.open_features("spair", "rand", 0, 0)
    cache = predict_module.pair_feature_cache(arrays, store.image_rows("spair"), "raw", [], torch.device("cpu"))
    pairs = dataset.pairs()[:8]
    matcher = DiftMatcher()
    batched = match_pairs(pairs, cache.pair, matcher, batch_by_target=True)
    single = match_pairs(pairs, cache.pair, matcher, batch_by_target=False)
    assert len(batched) == len(single) == 8
    assert [len(a) for a in batched] == [len(b) for b in single]
    same = np.concatenate([np.all(a == b, axis=1) for a, b in zip(batched, single)])
    assert same.mean() > 0.8  # random float features: equal up to float32 near-ties (exact: test above)


def test_device_names():
    assert resolve_match_device("cpu") == torch.device("cpu")
    assert resolve_match_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DitfError, match="unknown device"):
        resolve_match_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DitfError, match="no CUDA"):
            resolve_match_device("cuda")


def test_bad_jobs_and_device_are_refused_before_anything_is_stored(demo_store):
    store, dataset, _ = demo_store
    with pytest.raises(DitfError, match="--jobs"):
        predict(store, dataset, "rand", 0, 0, MatchSettings(variant="raw", jobs=0), progress=False)
    with pytest.raises(DitfError, match="device"):
        predict(store, dataset, "rand", 0, 0, MatchSettings(variant="adaln-c", device="tpu"), progress=False)
    assert not store.has("spair/rand/k0/t0/predictions/adaln-c")


def test_torch_mutual_nearest_neighbours_equal_the_numpy_ones():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((70, 32)).astype(np.float32), rng.standard_normal((90, 32)).astype(np.float32)
    b[:40] = a[:40] + 0.01 * rng.standard_normal((40, 32)).astype(np.float32)
    expected = numpy_mnn(a, b)
    got = mutual_nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert torch.equal(nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b)),
                       nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b), "torch"))


def test_hpatches_device_path_samples_like_dift():
    """The GPU path of `homography.match_pair` (grid_sample + torch MNN), run on the CPU."""
    rng = np.random.default_rng(4)
    fa, fb = rng.standard_normal((15, 20, 16)).astype(np.float32), rng.standard_normal((15, 20, 16)).astype(np.float32)
    fb[:, :10] = fa[:, :10]
    kps = np.stack([rng.uniform(0, 319, 60), rng.uniform(0, 239, 60)], axis=1)
    host = numpy_mnn(sample_descriptors(fa, kps, (320, 240)), sample_descriptors(fb, kps, (320, 240)))
    device = _device_matches(fa, fb, kps, kps, (320, 240), (320, 240), "cpu")
    np.testing.assert_array_equal(device, host)


def test_match_stage_imports_no_model_adapter():
    code = ("import sys, ditf_pipeline.match.predict, ditf_pipeline.match.matchers, ditf_pipeline.match.features, ditf_pipeline.score.pck; "
            "bad = [m for m in sys.modules if m.startswith('ditf_pipeline.models') or m == 'diffusers']; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float64_taps_give_the_referee_of_the_benchmark():
    """The benchmark's referee: the low-resolution identity with float64 taps equals the float64
    materialised upsampling (what F.interpolate computes on float64 input)."""
    import torch.nn.functional as F

    from ditf_pipeline.match.matchers import upsampled_norms

    grid = torch.randn(7, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(grid.permute(2, 0, 1)[None], size=(61, 83), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(upsampled_norms(grid, (83, 61)), torch.linalg.vector_norm(up, dim=0), rtol=1e-12, atol=0)
    assert upsampled_norms(grid, (83, 61)).dtype == torch.float64


def test_cli_match_has_jobs():
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["match", "--help"])
    assert result.exit_code == 0 and "--jobs" in result.output


def _child_processes() -> list[int]:
    from pathlib import Path

    return [int(c) for task in Path(f"/proc/{os.getpid()}/task").glob("*")
            for c in (task / "children").read_text().split()]


def test_workers_started_early_are_stopped_when_nothing_is_left_to_match(demo_store, monkeypatch):
    _, dataset, base = demo_store
    monkeypatch.setattr(predict_module, "POOL_MIN_PAIRS", 1)
    started = []

    class SeenPool(WorkerPool):
        def __init__(self, jobs, **options):
            super().__init__(jobs, **options)
            started.extend(process.pid for _, process in self._processes)

    monkeypatch.setattr(predict_module, "WorkerPool", SeenPool)
    with FeatureStore(base / "s.zarr") as store:
        predict(store, dataset, "rand", 0, 0, MatchSettings(variant="raw", jobs=2), overwrite=True, progress=False)
        report = predict(store, dataset, "rand", 0, 0, MatchSettings(variant="raw", jobs=2), progress=False)
    assert report.matched == 0 and report.workers == 1  # the second run found every pair done
    assert len(started) == 2  # both runs started a worker process at once...
    assert not set(started) & set(_child_processes())  # ...and none is left
