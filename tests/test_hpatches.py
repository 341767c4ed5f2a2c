"""HPatches: reader, demo data, DIFT's descriptor sampling, MNN, LMEDS and the corner error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.datasets.hpatches import grid_keypoints
from ditf_pipeline.demo import make_demo
from ditf_pipeline.demo.hpatches import make_hpatches_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match.homography import (
    corner_error,
    estimate_homography,
    homography_accuracy,
    match_pair,
    mutual_nearest_neighbours,
    sample_descriptors,
)
from ditf_pipeline.core.images import load_rgb


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_hpatches_demo(tmp_path_factory.mktemp("hp") / "hpatches")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_deterministic_and_registered(tmp_path):
    a = make_hpatches_demo(tmp_path / "a")
    assert _files(a) == _files(make_demo("hpatches", tmp_path / "b"))
    assert _files(a) != _files(make_hpatches_demo(tmp_path / "c", seed=1))
    with pytest.raises(DitfError, match="not empty"):
        make_hpatches_demo(a)


def test_reader_parses_demo(demo):
    ds = get_dataset("hpatches", demo)
    assert ds.task == "homography" and ds.sequences() == ["i_demo", "v_demo"]
    assert [r.key for r in ds.images()][:7] == [
        "i_demo/1",
        "i_demo/2",
        "i_demo/3",
        "i_demo/4",
        "i_demo/5",
        "i_demo/6",
        "v_demo/1",
    ]
    assert all(r.category is None for r in ds.images())
    pairs = ds.homography_pairs()
    assert len(pairs) == 10 and [p.kind for p in pairs] == ["i"] * 5 + ["v"] * 5
    assert pairs[0].src_key == "i_demo/1" and pairs[0].trg_key == "i_demo/2" and pairs[0].src_size == (160, 120)
    np.testing.assert_array_equal(pairs[0].H, np.eye(3))
    assert not np.allclose(pairs[7].H, np.eye(3))
    assert "superpoint-1k" in ds.keypoint_source
    kps = ds.keypoints("v_demo/3")
    assert kps.ndim == 2 and kps.shape[1] == 2 and len(kps) > 50
    # the release folder itself works as the root, and "v" selects the viewpoint sequences
    assert get_dataset("hpatches", demo / "hpatches-sequences-release", split="v").sequences() == ["v_demo"]


def test_grid_fallback_and_bad_files(demo, tmp_path):
    root = tmp_path / "nokp"
    shutil.copytree(demo / "hpatches-sequences-release", root / "hpatches-sequences-release")
    ds = get_dataset("hpatches", root)
    assert "grid" in ds.keypoint_source
    grid = ds.keypoints("i_demo/1")
    assert 950 <= len(grid) <= 1050
    np.testing.assert_allclose(grid, grid_keypoints((160, 120)))
    assert grid[:, 0].min() > 0 and grid[:, 0].max() < 159 and grid[:, 1].max() < 119
    (root / "hpatches-sequences-release" / "v_demo" / "H_1_4").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DitfError, match="H_1_4: expected 9 numbers"):
        ds.homography_pairs()
    kp_dir = tmp_path / "kp"
    kp_dir.mkdir()
    (kp_dir / "i_demo-1.kp").write_text("10 10\n500 20\n")
    with pytest.raises(DitfError, match="outside"):
        get_dataset("hpatches", root, keypoints=kp_dir).keypoints("i_demo/1")
    (kp_dir / "i_demo-1.kp").write_text("10 10 3\n")
    with pytest.raises(DitfError, match="two columns"):
        get_dataset("hpatches", root, keypoints=kp_dir).keypoints("i_demo/1")
    with pytest.raises(DitfError, match="does not look like HPatches"):
        get_dataset("hpatches", tmp_path / "kp")


def test_corner_error_hand_computed():
    size = (11, 11)  # corners (0,0), (0,10), (10,0), (10,10)
    H_gt = np.diag([2.0, 2.0, 1.0])  # corners go to (0,0), (0,20), (20,0), (20,20)
    expected = (0 + 10 + 10 + np.hypot(10, 10)) / 4  # identity estimate: 8.5355...
    assert corner_error(np.eye(3), H_gt, size) == pytest.approx(expected)
    assert corner_error(H_gt * 3.0, H_gt, size) == pytest.approx(0.0, abs=1e-12)  # exact (up to scale)
    shift = np.array([[1, 0, 3.0], [0, 1, 4.0], [0, 0, 1]])
    assert corner_error(np.eye(3), shift, (640, 480)) == pytest.approx(5.0)
    assert corner_error(None, shift, size) == float("inf")
    acc = homography_accuracy([0.5, 3.0, 4.0, 9.0, float("inf"), 1.0], ["i", "i", "v", "v", "v", "i"])
    assert acc["overall"] == {
        "n": 6,
        "acc@1": pytest.approx(200 / 6),
        "acc@3": 50.0,
        "acc@5": pytest.approx(400 / 6),
    }
    assert acc["illumination"]["acc@3"] == 100.0  # error 3.0 counts at 3 px (<=)
    assert acc["viewpoint"] == {
        "n": 3,
        "acc@1": 0.0,
        "acc@3": 0.0,
        "acc@5": pytest.approx(100 / 3),
    }


def test_sampling_matches_dift_grid_sample():
    """Our numpy sampler against DIFT's own lines of eval_hpatches.py, on a random map."""
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(7, 9, 5)).astype(np.float32)  # rows, cols, D
    w, h = 120, 90
    kps = np.concatenate(
        [
            rng.uniform([0, 0], [w - 1, h - 1], size=(50, 2)),
            [[0, 0], [w - 1, h - 1], [0, h - 1], [3.3, 88.7]],
        ]
    )
    coord = torch.from_numpy(kps).float()[None]  # 1, N, 2
    c = torch.Tensor([(w - 1) / 2.0, (h - 1) / 2.0]).float()
    coord_norm = (coord - c) / c
    ref = F.grid_sample(
        torch.from_numpy(feat).permute(2, 0, 1)[None],
        coord_norm.unsqueeze(2),
        align_corners=False,
    )
    ref = ref.squeeze(-1).transpose(1, 2).squeeze(0).numpy()
    np.testing.assert_allclose(sample_descriptors(feat, kps, (w, h)), ref, rtol=1e-5, atol=1e-6)


def test_mutual_nearest_neighbours():
    a = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    b = np.array([[0, 2], [3, 0.1], [-1, 0]], dtype=np.float32)
    # a0 <-> b1, a1 <-> b0; a2's nearest (b0 or b1) prefers someone else
    np.testing.assert_array_equal(mutual_nearest_neighbours(a, b), [[0, 1], [1, 0]])
    assert estimate_homography(np.zeros((3, 2)), np.zeros((3, 2))) is None


def _texture_features(path: Path, radius: int = 4, step: int = 2) -> np.ndarray:
    """Pixel-colour texture descriptor per pixel: the blurred 5x5-sampled 9x9 patch, z-scored."""
    img = cv2.GaussianBlur(np.asarray(load_rgb(path), dtype=np.float32), (0, 0), 1.5)
    h, w, _ = img.shape
    pad = cv2.copyMakeBorder(img, radius, radius, radius, radius, cv2.BORDER_REFLECT)
    offsets = range(-radius, radius + 1, step)
    feat = np.concatenate(
        [pad[radius + dy : radius + dy + h, radius + dx : radius + dx + w] for dy in offsets for dx in offsets],
        axis=2,
    )
    feat -= feat.mean(axis=2, keepdims=True)
    return feat / (feat.std(axis=2, keepdims=True) + 1e-6)


@pytest.mark.parametrize("keypoints", ["files", "grid"])
def test_mnn_lmeds_recovers_demo_homographies(demo, tmp_path, keypoints):
    if keypoints == "files":
        ds = get_dataset("hpatches", demo)
    else:
        root = tmp_path / "grid"
        shutil.copytree(demo / "hpatches-sequences-release", root / "hpatches-sequences-release")
        ds = get_dataset("hpatches", root)
    paths = {r.key: r.path for r in ds.images()}
    feats = {key: _texture_features(path) for key, path in paths.items()}
    errors, kinds = [], []
    for pair in ds.homography_pairs():
        est = match_pair(
            feats[pair.src_key], feats[pair.trg_key], ds.keypoints(pair.src_key), ds.keypoints(pair.trg_key),
            pair.src_size, pair.trg_size, H_gt=pair.H,
        )  # fmt: skip
        assert est.n_matches >= 20
        errors.append(est.error)
        kinds.append(pair.kind)
    limit = 2.0 if keypoints == "files" else 6.0  # grid points do not correspond exactly
    assert max(errors) < limit, errors
    assert homography_accuracy(errors, kinds)["illumination"]["acc@1"] == 100.0


def test_homography_module_does_not_import_torch():
    code = "import sys, ditf_pipeline.match.homography, ditf_pipeline.datasets.hpatches; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
