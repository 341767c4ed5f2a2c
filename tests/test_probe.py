"""ADE20K reader, demo data and the linear segmentation probe (`ditf probe`), without any DiT.

Features with known content (per-cell mean colour and a few fixed functions of it) are written
straight into stores, one store per "image scale"; the demo's classes are decided by colour, so
a linear head on these features must segment the validation images almost perfectly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.datasets.ade20k import CLASSES, IGNORE_INDEX, reduce_zero_label
from ditf_pipeline.demo import make_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import image_size, load_rgb
from ditf_pipeline.probe import (
    ProbeSettings,
    confusion_matrix,
    iou_from_confusion,
    load_head,
    open_sources,
    run_probe,
    train_probe,
)
from ditf_pipeline.store.feature_store import FeatureStore

DIM = 12
MODEL = "colour"


# ---- data -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_demo("ade20k", tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def colour_features(path: Path, stride: int) -> np.ndarray:
    """(rows, cols, DIM): mean colour per stride cell, its pairwise products and 3 random mixes."""
    img = np.asarray(load_rgb(path), dtype=np.float32) / 255.0
    rows, cols = img.shape[0] // stride, img.shape[1] // stride
    c = img[: rows * stride, : cols * stride].reshape(rows, stride, cols, stride, 3).mean(axis=(1, 3))
    products = [c[..., i : i + 1] * c[..., j : j + 1] for i in range(3) for j in range(i, 3)]
    mixes = np.tanh((c - 0.5) @ np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32))
    return np.concatenate([c - 0.5, *products, mixes], axis=-1)


def write_store(path: Path, root: Path, stride: int, img_size: int, modulation: bool = True) -> FeatureStore:
    store = FeatureStore(path)
    names = ["shift_t", "scale_t", "gate_t", "shift_c", "scale_c", "gate_c"] if modulation else []
    for split in ("training", "validation"):
        records = get_dataset("ade20k", root, split).images()
        rows = store.register_images("ade20k", [r.key for r in records], [image_size(r.path) for r in records])
        arrays = store.open_features(
            "ade20k", MODEL, 0, 0, config={"model": MODEL, "img_size": img_size}, n_images=len(rows),
            grid_max=(32, 32), hidden_size=DIM, modulation_names=names, adaln=modulation,
        )
        vectors = {name: np.full(DIM, 0.1 if "shift" in name else 0.0, dtype=np.float32) for name in arrays.modulation_names}
        for record in records:
            arrays.write_image(rows[record.key], colour_features(record.path, stride).astype(np.float16), vectors)
    return store


@pytest.fixture(scope="module")
def stores(ade, tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    return write_store(base / "s8.zarr", ade, 8, 96), write_store(base / "s4.zarr", ade, 4, 192)


# ---- reader ----------------------------------------------------------------------------------------
def test_reader_reads_the_real_layout(ade):
    assert len(CLASSES) == 150
    train, val = get_dataset("ade20k", ade, "training"), get_dataset("ade20k", ade, "validation")
    assert train.task == "segmentation" and train.num_classes == 150
    assert [r.key for r in val.images()] == [f"validation/ADE_val_{i:08d}" for i in range(1, 7)]
    assert len(train.images()) == 12 and get_dataset("ade20k", ade, "val").split == "validation"
    record = val.images()[1]
    raw = np.asarray(Image.open(ade / "annotations" / "validation" / f"{Path(record.path).stem}.png"))
    labels = val.load_label(record.key)
    assert labels.shape == raw.shape == (96, 64) and labels.dtype == np.uint8  # portrait image
    assert np.array_equal(labels[raw == 0], np.full((raw == 0).sum(), IGNORE_INDEX))
    assert np.array_equal(labels[raw > 0], raw[raw > 0] - 1)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
    assert np.array_equal(reduce_zero_label(np.array([0, 1, 150])), [255, 0, 149])


def test_reader_refuses_bad_input(ade, tmp_path):
    with pytest.raises(DitfError, match="unknown ADE20K split 'test'"):
        get_dataset("ade20k", ade, "test")
    with pytest.raises(DitfError, match="does not look like ADE20K"):
        get_dataset("ade20k", tmp_path)
    val = get_dataset("ade20k", ade, "validation")
    for key in ("training/ADE_train_00000001", "validation/../../etc/passwd", "ADE_val_00000001"):
        with pytest.raises(DitfError, match="is not an image of the ADE20K validation split"):
            val.load_label(key)
    # a copy of the layout with broken annotations
    import shutil

    root = tmp_path / "ade"
    shutil.copytree(ade, root)
    label = root / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.fromarray(np.full((64, 96), 151, dtype=np.uint8), "L").save(label)
    bad = get_dataset("ade20k", root, "validation")
    with pytest.raises(DitfError, match=r"ADE_val_00000001.png holds value 151; valid values are 0..150"):
        bad.load_label("validation/ADE_val_00000001")
    Image.new("RGB", (96, 64)).save(label)
    with pytest.raises(DitfError, match="has mode 'RGB'"):
        bad.load_label("validation/ADE_val_00000001")
    Image.new("L", (90, 64)).save(label)
    with pytest.raises(DitfError, match="is 90x64 but its image .* is 96x64"):
        bad.load_label("validation/ADE_val_00000001")
    label.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DitfError, match="cannot read ADE20K annotation .*ADE_val_00000001.png"):
        bad.load_label("validation/ADE_val_00000001")
    label.unlink()
    with pytest.raises(DitfError, match="missing ADE20K annotation .*ADE_val_00000001.png"):
        get_dataset("ade20k", root, "validation").images()


def test_demo_is_deterministic(ade, tmp_path):
    again = make_demo("ade20k", tmp_path / "again")
    files = sorted(p.relative_to(ade) for p in ade.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((ade / f).read_bytes() == (again / f).read_bytes() for f in files)
    with pytest.raises(DitfError, match="not empty"):
        make_demo("ade20k", again)


# ---- metrics ---------------------------------------------------------------------------------------
def test_confusion_matrix_and_iou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, gt, num_classes=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    # rows = ground truth, columns = prediction; the 255 pixel is ignored
    expected[0, 0], expected[0, 1] = 1, 1
    expected[1, 1], expected[1, 0] = 2, 1
    expected[2, 2], expected[2, 0] = 1, 1
    assert np.array_equal(cm, expected)
    m = iou_from_confusion(cm)
    # class 0: tp 1, fp 2 (from 1 and 2), fn 1 -> 1/4; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: 1/2
    assert np.allclose(m["iou"][:3], [0.25, 0.5, 0.5]) and np.isnan(m["iou"][3])  # class 3 absent: not averaged
    assert m["miou"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert m["aacc"] == pytest.approx(4 / 7)
    # a class predicted but never in the ground truth counts with IoU 0
    from ditf_pipeline.probe.metrics import summary as _summary

    summary = _summary(cm, ["a", "b", "c", "d"])  # the report: percent at full precision
    assert summary["miou"] == 100.0 * m["miou"] and summary["aacc"] == 100.0 * (4 / 7)
    assert summary["per_class_iou"]["a"] == 25.0 and summary["per_class_iou"]["d"] is None
    m2 = iou_from_confusion(confusion_matrix(np.array([3, 1]), np.array([1, 1]), 4))
    assert m2["iou"][1] == 0.5 and m2["iou"][3] == 0 and m2["miou"] == pytest.approx(0.25)
    with pytest.raises(DitfError, match="outside"):
        confusion_matrix(np.array([9]), np.array([0]), 4)


# ---- the probe -------------------------------------------------------------------------------------
SETTINGS = ProbeSettings(variant="raw", epochs=12, lr=0.05, batch_size=4, warmup_steps=0, train_label_side=48)


def _datasets(root):
    return get_dataset("ade20k", root, "training"), get_dataset("ade20k", root, "validation")


@pytest.mark.slow
def test_head_on_colour_features_segments_the_demo_single_and_multi_scale(ade, stores, tmp_path):
    train, val = _datasets(ade)
    report = run_probe(list(stores), train, val, MODEL, 0, 0, SETTINGS, out_dir=tmp_path / "head", progress=False)
    assert report.finished and report.steps == report.total_steps == 12 * 3
    assert report.scales == [96, 192]
    single, multi = report.single_scale, report.multi_scale
    assert single["miou"] > 85 and multi["miou"] > 85, (single["miou"], multi["miou"])
    present = {name: v for name, v in single["per_class_iou"].items() if v is not None}
    assert set(present) == set(CLASSES[:5])  # classes that never occur have no IoU
    head, config = load_head(tmp_path / "head")
    assert tuple(head.linear.weight.shape) == (150, DIM) and not head.training
    assert config["results"]["single_scale"]["miou"] == single["miou"] and config["in_channels"] == DIM
    assert config["stores"] == [str(s.path) for s in stores] and config["num_classes"] == 150
    # a random (untrained) head is far worse: the metric can fail
    bad = run_probe([stores[0]], train, val, MODEL, 0, 0, ProbeSettings(variant="raw", epochs=1, lr=1e-6, batch_size=4, train_label_side=32),
                    out_dir=tmp_path / "bad", progress=False)
    assert bad.single_scale["miou"] < 40 and bad.multi_scale is None


def test_adaln_variant_and_models_without_modulation(ade, stores, tmp_path):
    train, val = _datasets(ade)
    report = run_probe([stores[0]], train, val, MODEL, 0, 0, ProbeSettings(variant="adaln", epochs=6, lr=0.05,
                       batch_size=4, warmup_steps=0, train_label_side=32), out_dir=tmp_path / "adaln", progress=False)
    assert report.single_scale["miou"] > 60
    baseline = write_store(tmp_path / "baseline.zarr", ade, 8, 96, modulation=False)  # e.g. DINOv2: no AdaLN
    with pytest.raises(DitfError, match="holds no shift, scale modulation vectors .*use --variant raw"):
        open_sources([baseline], "ade20k", MODEL, 0, 0, "adaln")
    with pytest.raises(DitfError, match="channel discard is not used"):
        open_sources([baseline], "ade20k", MODEL, 0, 0, "adaln+cd")
    raw = run_probe([baseline], train, val, MODEL, 0, 0, ProbeSettings(variant="raw", epochs=2, lr=0.05, batch_size=4,
                    warmup_steps=0, train_label_side=32), out_dir=tmp_path / "raw", progress=False)
    assert raw.finished and raw.single_scale["miou"] > 30


def test_interrupted_training_resumes_to_the_same_head_bit_for_bit(ade, stores, tmp_path):
    train, _ = _datasets(ade)
    source = open_sources([stores[0]], "ade20k", MODEL, 0, 0, "raw")[0]
    settings = ProbeSettings(variant="raw", epochs=3, lr=0.05, batch_size=5, warmup_steps=2, train_label_side=32)  # 3 steps/epoch
    full, info = train_probe(source, train, settings, tmp_path / "full", progress=False, checkpoint_every=4)
    assert info["finished"] and info["resumed_from"] is None
    part, info = train_probe(source, train, settings, tmp_path / "cut", progress=False, stop_after=4)
    assert not info["finished"] and info["steps"] == 4
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["epoch"] == 1 and all(isinstance(v, int) for v in state["rng"]["torch_cpu"])
    resumed, info = train_probe(source, train, settings, tmp_path / "cut", progress=False)
    assert info["resumed_from"] == 4 and info["finished"]
    for name, value in full.state_dict().items():
        assert np.array_equal(value.numpy(), resumed.state_dict()[name].numpy()), name
    assert not np.array_equal(part.state_dict()["linear.weight"].numpy(), full.state_dict()["linear.weight"].numpy())
    # other settings: refused, unless --no-resume
    other = ProbeSettings(variant="raw", epochs=3, lr=0.01, batch_size=5, warmup_steps=2, train_label_side=32)
    with pytest.raises(DitfError, match=r"other settings \(lr: 0.05 -> 0.01\): pass --no-resume"):
        train_probe(source, train, other, tmp_path / "cut", progress=False)
    _, info = train_probe(source, train, other, tmp_path / "cut", progress=False, resume=False, stop_after=1)
    assert info["resumed_from"] is None and info["steps"] == 1


def test_missing_features_and_store_mismatch(ade, stores, tmp_path):
    train, val = _datasets(ade)
    empty = FeatureStore(tmp_path / "empty.zarr")
    with pytest.raises(DitfError, match="no features for ade20k/colour/k0/t0"):
        run_probe([empty], train, val, MODEL, 0, 0, SETTINGS, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(DitfError, match="same image scale"):
        open_sources([stores[0], stores[0]], "ade20k", MODEL, 0, 0, "raw")


def test_cli_probe(ade, stores, tmp_path):
    from ditf_cli.main import app
    from typer.testing import CliRunner

    out = tmp_path / "cli"
    args = ["probe", "--model", MODEL, "--dataset", "ade20k", "--data-root", str(ade), "--store", str(stores[0].path),
            "--store", str(stores[1].path), "--variant", "raw", "--epochs", "6", "--lr", "0.05", "--batch-size", "4", "--train-label-side", "32",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and "multi-scale" in result.output
    assert (out / "head.safetensors").is_file() and json.loads((out / "head.json").read_text())["scales"] == [96, 192]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "resumed at step 18" in again.output, again.output
    bad = CliRunner().invoke(app, [*args[:9], "--variant", "adaln+cd", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 1 and "error: unknown probe variant 'adaln+cd'" in bad.output


@pytest.mark.slow
def test_demo_ade20k_runs_the_probe_end_to_end(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ditf_cli.main", "demo", "--dataset", "ade20k", "--out", str(tmp_path),
                             "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout and "single-scale" in result.stdout
    assert (tmp_path / "probe" / "head.safetensors").is_file()
    assert json.loads((tmp_path / "probe" / "head.json").read_text())["results"]["single_scale"]["miou"] >= 0
