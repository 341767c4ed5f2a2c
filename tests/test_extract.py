"""The extract stage end to end on generated SPair-layout data and tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.models import load_adapter
from ditf_pipeline.adaln import modulate
from ditf_pipeline.store.feature_store import FeatureStore

DITF = [sys.executable, "-m", "ditf_cli.main"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return make_spair_demo(tmp_path_factory.mktemp("data") / "SPair", categories=("cat",), pairs_per_category=2)  # 3 images


def _extract(root, store_path, model="tiny-flux", **overrides):
    settings = dict(ks=[1, 3], ts=[260], img_size=96, ensemble_size=2, seed=0, prompt="template")
    settings.update(overrides)
    adapter = load_adapter(model, dtype="fp32", device="cpu")
    extractor = Extractor(adapter, FeatureStore(store_path), ExtractSettings(**settings))
    return extractor, extractor.run(get_dataset("spair", root, "test"), progress=False)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_extract_writes_features_that_reproduce_the_block(demo_root, tmp_path):
    extractor, report = _extract(demo_root, tmp_path / "s.zarr")
    dataset = get_dataset("spair", demo_root, "test")
    assert report.extracted == len(dataset.images()) and report.skipped == 0
    store = FeatureStore(tmp_path / "s.zarr", read_only=True)
    rows = store.image_rows("spair")
    assert set(rows) == {r.key for r in dataset.images()}
    for k in (1, 3):
        arrays = store.open_features("spair", "tiny-flux", k, 260)
        assert arrays.complete().all()
        record = dataset.images()[0]
        pre_adaln, mods = arrays.read_image(rows[record.key])
        # what the extractor computes for this image, recomputed directly
        from ditf_pipeline.core.images import load_rgb, preprocess

        pixels = preprocess(load_rgb(record.path), 96)
        assert pre_adaln.shape[:2] == (pixels.shape[1] // 16, pixels.shape[2] // 16)
        prompt = extractor.encode_prompts({"a photo of a " + record.category})["a photo of a " + record.category]
        direct = extractor.features_for(pixels, prompt, record.key, 260, [k])[k]
        assert np.array_equal(direct[0], pre_adaln)
        assert np.allclose(direct[1]["shift"], mods["shift"]) and np.allclose(direct[1]["scale"], mods["scale"])
        assert set(mods) >= {"shift", "scale", "gate", "shift_t", "scale_t", "shift_c", "scale_c"}
        assert not np.allclose(mods["shift_t"], mods["shift"])
        # the stored raw z modulated by the stored vectors is a proper AdaLN feature
        feature = modulate(torch.from_numpy(pre_adaln.astype(np.float32))[None], torch.from_numpy(mods["shift"])[None],
                           torch.from_numpy(mods["scale"])[None])
        assert torch.isfinite(feature).all()


def test_rerun_skips_complete_images_and_is_bit_identical(demo_root, tmp_path):
    _extract(demo_root, tmp_path / "a.zarr")
    before = _tree(tmp_path / "a.zarr")
    _, report = _extract(demo_root, tmp_path / "a.zarr")
    assert report.extracted == 0 and report.skipped > 0
    _extract(demo_root, tmp_path / "b.zarr")
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["spair/tiny-flux/k3/t260/pre_adaln"][:]
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["spair/tiny-flux/k3/t260/pre_adaln"][:]
    assert np.array_equal(a, b)
    assert _tree(tmp_path / "a.zarr").keys() == before.keys()


def test_conflicting_configuration_is_refused_and_store_untouched(demo_root, tmp_path):
    _extract(demo_root, tmp_path / "s.zarr")
    before = _tree(tmp_path / "s.zarr")
    with pytest.raises(DitfError, match="ensemble_size: 2 -> 3"):
        _extract(demo_root, tmp_path / "s.zarr", ensemble_size=3)
    assert _tree(tmp_path / "s.zarr") == before


def test_several_timesteps_and_blocks_in_one_run(demo_root, tmp_path):
    _, report = _extract(demo_root, tmp_path / "s.zarr", ks=[0, 2], ts=[90, 260], ensemble_size=1)
    store = FeatureStore(tmp_path / "s.zarr", read_only=True)
    assert store.feature_keys("spair") == [
        ("spair", "tiny-flux", k, t) for k in (0, 2) for t in (90, 260)
    ]
    a, _ = store.open_features("spair", "tiny-flux", 2, 90).read_image(0)
    b, _ = store.open_features("spair", "tiny-flux", 2, 260).read_image(0)
    assert not np.array_equal(a, b)


def _run_cli(*args, cwd=None, check=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*DITF, *args], capture_output=True, text=True, env=env, cwd=cwd, check=check)


@pytest.mark.slow
def test_kill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    root = make_spair_demo(tmp_path / "SPair", categories=("cat", "car", "dog"), pairs_per_category=10)
    common = ["extract", "--model", "tiny-flux", "--dataset", "spair", "--data-root", str(root), "--k", "1",
              "--k", "3", "--img-size", "128", "--ensemble-size", "8", "--dtype", "fp32", "--no-progress"]
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*DITF, *common, "--store", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    n_done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            n_done = int(zarr.open_group(str(killed), mode="r")["spair/tiny-flux/k3/t260/complete"][:].sum())
        except Exception:
            n_done = 0
        if n_done >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "extract finished before it could be killed: make the workload larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_images = len(get_dataset("spair", root, "test").images())
    after_kill = zarr.open_group(str(killed), mode="r")["spair/tiny-flux/k3/t260/complete"][:]
    assert 0 < after_kill.sum() < n_images
    resumed = _run_cli(*common, "--store", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "already complete" in resumed.stdout
    clean = tmp_path / "clean.zarr"
    assert _run_cli(*common, "--store", str(clean)).returncode == 0
    for k in (1, 3):
        a = zarr.open_group(str(killed), mode="r")[f"spair/tiny-flux/k{k}/t260"]
        b = zarr.open_group(str(clean), mode="r")[f"spair/tiny-flux/k{k}/t260"]
        for name in ("pre_adaln", "grid", "shift", "scale", "gate", "shift_t", "complete"):
            assert np.array_equal(a[name][:], b[name][:]), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--dataset", "no-such-set"], "unknown dataset"),
        (["--k", "99"], "out of range"),
        (["--data-root", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_arguments_get_one_line_and_nonzero_exit(demo_root, tmp_path, args, message):
    base = {"--model": "tiny-flux", "--dataset": "spair", "--data-root": str(demo_root)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [item for pair in base.items() for item in pair]
    # in-process through the typer app: the refusal is the app's; the real process's exit path is
    # test_bad_inputs.py::test_bad_input_through_a_real_process (an interpreter start each costs seconds)
    result = CliRunner().invoke(app, ["extract", *flat, "--store", str(tmp_path / "s.zarr"), "--no-progress"])
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # no crash
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s.zarr").exists()  # refused before the store was created


@pytest.mark.slow
def test_corrupt_image_and_malformed_pair_leave_store_intact(tmp_path):
    root = make_spair_demo(tmp_path / "SPair", pairs_per_category=2)
    store = tmp_path / "s.zarr"
    common = ["extract", "--model", "tiny-flux", "--data-root", str(root), "--store", str(store), "--no-progress",
              "--img-size", "96", "--ensemble-size", "1"]
    assert _run_cli(*common).returncode == 0
    before = _tree(store)
    dirs = {p for p in store.rglob("*") if p.is_dir()}
    image = sorted((root / "JPEGImages").rglob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])  # header readable, pixels cut off
    # a new timestep forces the truncated image to be read
    result = _run_cli(*common, "--t", "90")
    assert result.returncode == 1 and "cannot read image" in result.stderr and "Traceback" not in result.stderr
    pair = sorted((root / "PairAnnotation" / "test").glob("*.json"))[0]
    pair.write_text("{not json", encoding="utf-8")
    result = _run_cli(*common)
    assert result.returncode == 1 and pair.name in result.stderr and "Traceback" not in result.stderr
    assert _tree(store) == before  # every file, including any the failed runs could have added
    assert {p for p in store.rglob("*") if p.is_dir()} == dirs  # no new key folders either


def test_short_side_resize_sizes_the_grid_from_the_images(demo_root, tmp_path):
    extractor, report = _extract(demo_root, tmp_path / "s.zarr", ks=[1], img_size=64, ensemble_size=1, resize="short")
    store = FeatureStore(tmp_path / "s.zarr", read_only=True)
    arrays = store.open_features("spair", "tiny-flux", 1, 260)
    assert arrays.config["resize_side"] == "short"
    from ditf_pipeline.core.images import image_size, model_size

    dataset = get_dataset("spair", demo_root, "test")
    rows = store.image_rows("spair")
    for record in dataset.images():
        width, height = model_size(*image_size(record.path), 64, 16, side="short")
        pre_adaln, _ = arrays.read_image(rows[record.key])
        assert pre_adaln.shape[:2] == (height // 16, width // 16) and min(height, width) == 64
