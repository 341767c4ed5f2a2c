"""Extraction and matching over dask.distributed workers equal a single-process run, bit for bit,
also when a worker process is killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

distributed = pytest.importorskip("distributed")

from ditf_pipeline.datasets import get_dataset  # noqa: E402
from ditf_pipeline.demo import make_spair_demo  # noqa: E402
from ditf_pipeline.distributed.runners import AdapterArgs, extract_distributed, predict_distributed  # noqa: E402
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings  # noqa: E402
from ditf_pipeline.models import load_adapter  # noqa: E402
from ditf_pipeline.match.predict import MatchSettings, predict  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: runs whole commands/scripts/clusters (`-m "not slow"` skips them)

ARGS = AdapterArgs("tiny-flux", dtype="fp32", device="cpu")
KEY = "spair/tiny-flux/k{k}/t260"
ARRAYS = ("pre_adaln", "grid", "shift", "scale", "gate", "shift_t", "scale_t", "gate_t", "shift_c", "complete")


def _predictions(path: Path):
    """The only predictions group of k3 (its path carries the split and pair-list digest)."""
    ((_, arrays),) = FeatureStore(path, read_only=True).prediction_groups("spair", "tiny-flux", 3, 260)
    return arrays.group


def _settings() -> ExtractSettings:
    return ExtractSettings(ks=[1, 3], ts=[260], img_size=96, ensemble_size=2, seed=0, prompt="template")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_spair_demo(tmp_path_factory.mktemp("data") / "SPair", categories=("cat", "car", "dog"), pairs_per_category=6)
    return get_dataset("spair", root, "test")


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """The single-process run everything distributed must equal."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    Extractor(load_adapter("tiny-flux", dtype="fp32", device="cpu"), FeatureStore(path), _settings()).run(dataset, progress=False)
    predict(FeatureStore(path), dataset, "tiny-flux", 3, 260, MatchSettings(), progress=False)
    return path


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            # import the heavy modules in the workers once, outside the timed parts of the tests
            client.run(lambda: __import__("ditf_pipeline.models.flux") and None)
            yield client


def _assert_same_features(a_path: Path, b_path: Path) -> None:
    a, b = zarr.open_group(str(a_path), mode="r"), zarr.open_group(str(b_path), mode="r")
    assert [str(x) for x in a["spair/images/key"][:]] == [str(x) for x in b["spair/images/key"][:]]
    for k in (1, 3):
        for name in ARRAYS:
            x, y = a[f"{KEY.format(k=k)}/{name}"][:], b[f"{KEY.format(k=k)}/{name}"][:]
            assert x.dtype == y.dtype and np.array_equal(x, y), f"k={k} {name}"
        assert a[f"{KEY.format(k=k)}/complete"][:].all()


def test_two_workers_equal_single_process_bit_for_bit(dataset, reference, client, tmp_path):
    store = tmp_path / "dask.zarr"
    report = extract_distributed(client, ARGS, store, _settings(), dataset, progress=False, chunk_size=2)
    assert report.extracted == len(dataset.images()) and report.skipped == 0
    # both workers did part of the work (each loads the model once and writes its own images)
    assert len(client.scheduler_info()["workers"]) == 2
    _assert_same_features(reference, store)

    match = predict_distributed(client, FeatureStore(store), dataset, "tiny-flux", 3, 260, MatchSettings(), progress=False)
    assert match.matched == len(dataset.pairs())
    ref, got = _predictions(reference), _predictions(store)
    assert got["done"][:].all()
    assert np.array_equal(ref["pred"][:], got["pred"][:], equal_nan=True)
    assert [str(p) for p in ref["pair_id"][:]] == [str(p) for p in got["pair_id"][:]]

    # a rerun is a no-op: everything is complete / done
    again = extract_distributed(client, ARGS, store, _settings(), dataset, progress=False)
    assert again.extracted == 0 and again.skipped == len(dataset.images())


def test_worker_killed_mid_run_loses_nothing(dataset, reference, client, tmp_path):
    store = tmp_path / "killed.zarr"
    n_images = len(dataset.images())
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = extract_distributed(client, ARGS, store, _settings(), dataset, progress=False, chunk_size=1)
        except BaseException as exc:  # surfaced by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    pids = client.run(os.getpid)  # worker address -> pid
    killed_pid, done_at_kill, busy_at_kill = None, None, None
    deadline = time.time() + 90
    while time.time() < deadline and thread.is_alive():
        try:
            done = int(zarr.open_group(str(store), mode="r")[f"{KEY.format(k=3)}/complete"][:].sum())
        except Exception:  # arrays not created yet
            done = 0
        busy = {address: keys for address, keys in client.processing().items() if keys}
        if done >= 1 and busy:
            address = sorted(busy)[0]
            killed_pid, done_at_kill, busy_at_kill = pids[address], done, list(busy[address])
            os.kill(killed_pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    thread.join(timeout=120)
    assert killed_pid is not None, "the run finished before a worker could be killed: make the workload larger"
    # the kill happened mid-run: some images were committed, not all, and the worker had a task
    assert 0 < done_at_kill < n_images, done_at_kill
    assert busy_at_kill
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert result["report"].extracted == n_images
    # the killed process is gone (the nanny may have started a fresh one in its place)
    assert killed_pid not in client.run(os.getpid).values()
    _assert_same_features(reference, store)
