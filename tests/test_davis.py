"""DAVIS-2017: reader, demo data, J / F metrics, label propagation (DINO / DiTF algorithm)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.datasets.davis import davis_palette, read_mask, write_mask
from ditf_pipeline.score.davis_metrics import (
    RUN_MARKER,
    bound_pixels,
    db_eval_iou,
    db_statistics,
    evaluate_results,
    evaluate_sequence,
    f_measure,
    seg2bmap,
)
from ditf_pipeline.demo import make_demo
from ditf_pipeline.demo.davis import make_davis_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import load_rgb
from ditf_pipeline.match.video import PropagationSettings, propagate_davis, propagate_step

STRIDE = 4  # pixels per feature cell of the pixel-colour "features"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_davis_demo(tmp_path_factory.mktemp("davis") / "DAVIS", image_size=(192, 128))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- reader and demo ----------------------------------------------------------------------------
def test_demo_deterministic_and_registered(tmp_path):
    a = make_davis_demo(tmp_path / "a")
    b = make_demo("davis", tmp_path / "b")
    assert _files(a) == _files(b)
    assert (a / "ImageSets" / "2017" / "val.txt").read_text().split() == [
        "demo-disc",
        "demo-pair",
    ]
    with pytest.raises(DitfError, match="not empty"):
        make_davis_demo(a)


def test_reader_parses_demo(demo):
    ds = get_dataset("davis", demo)
    assert ds.task == "video" and ds.split == "val"
    assert ds.defaults["k"] == 24 and ds.defaults["t"] == 90 and ds.defaults["ensemble_size"] == 1
    seqs = ds.sequences()
    assert [s.name for s in seqs] == ["demo-disc", "demo-pair"]
    for seq in seqs:
        assert len(seq) == 8
        assert seq.frame_names == [f"{i:05d}" for i in range(8)]
        assert [r.key for r in seq.frames] == [f"{seq.name}/{i:05d}" for i in range(8)]
        assert all(r.category == seq.name for r in seq.frames)
        assert seq.first_mask == demo / "Annotations" / "480p" / seq.name / "00000.png"
        assert all(m is not None and m.is_file() for m in seq.gt_masks)
    images = ds.images()
    assert len(images) == 16 and images[0].key == "demo-disc/00000"
    assert ds.category_of("demo-pair/00003") == "demo-pair" and ds.category_of("nope/00000") is None
    labels, palette = read_mask(seqs[1].first_mask, with_palette=True)
    assert labels.shape == (128, 192) and set(np.unique(labels)) == {0, 1, 2}
    assert tuple(palette[1]) == (128, 0, 0) and tuple(palette[2]) == (0, 128, 0)
    assert [s.name for s in get_dataset("davis", demo, sequences="demo-pair").sequences()] == ["demo-pair"]


def test_reader_rejects_bad_layouts(demo, tmp_path):
    with pytest.raises(DitfError, match="split"):
        get_dataset("davis", demo, split="test")
    with pytest.raises(DitfError, match="does not look like DAVIS"):
        get_dataset("davis", tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(demo, bad)
    (bad / "ImageSets" / "2017" / "val.txt").write_text("demo-disc\n../../etc\n")
    with pytest.raises(DitfError, match="plain folder name"):
        get_dataset("davis", bad).sequences()
    (bad / "ImageSets" / "2017" / "val.txt").write_text("demo-disc\nmissing-seq\n")
    with pytest.raises(DitfError, match="missing-seq"):
        get_dataset("davis", bad).images()
    (bad / "ImageSets" / "2017" / "val.txt").write_text("demo-disc\n")
    (bad / "Annotations" / "480p" / "demo-disc" / "00000.png").unlink()
    with pytest.raises(DitfError, match="first-frame annotation"):
        get_dataset("davis", bad).sequences()


# -- metrics ------------------------------------------------------------------------------------
def _square(shape, r0, r1, c0, c1) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_j_hand_computed():
    gt = _square((10, 10), 2, 6, 2, 6)  # 16 px
    res = _square((10, 10), 2, 6, 5, 9)  # shifted right by 3: overlap one column (4 px)
    assert db_eval_iou(gt, res) == pytest.approx(4 / 28)
    assert db_eval_iou(gt, gt) == 1.0
    empty = np.zeros((10, 10), bool)
    assert db_eval_iou(empty, empty) == 1.0  # empty vs empty counts as perfect
    assert db_eval_iou(gt, empty) == 0.0
    np.testing.assert_allclose(db_eval_iou(np.stack([gt, empty]), np.stack([res, empty])), [4 / 28, 1.0])


def test_boundary_map_and_f_hand_computed():
    gt = _square((10, 10), 2, 6, 2, 6)
    # _seg2bmap puts the boundary half a pixel towards the origin: the ring of rows/cols 1..5
    ring = _square((10, 10), 1, 6, 1, 6) & ~_square((10, 10), 2, 5, 2, 5)
    np.testing.assert_array_equal(seg2bmap(gt), ring)
    assert bound_pixels((10, 10)) == 1.0  # ceil(0.008 * 14.14)
    assert bound_pixels((480, 854)) == 8.0
    res = _square((10, 10), 2, 6, 5, 9)
    # tolerance 1 px (a 3x3 cross): 9 of the 16 result boundary pixels lie within 1 px of the GT
    # boundary (the columns 4..6 of rows 1 and 5, and column 4 of rows 2..4) and, symmetrically,
    # 9 of the 16 GT boundary pixels -> P = R = F = 9/16
    assert f_measure(res, gt) == pytest.approx(9 / 16)
    assert f_measure(gt, gt) == 1.0
    empty = np.zeros((10, 10), bool)
    assert f_measure(empty, empty) == 1.0
    assert f_measure(empty, gt) == 0.0 and f_measure(gt, empty) == 0.0


def test_statistics_and_sequence_scores():
    mean, recall, decay = db_statistics(np.array([1, 1, 1, 1, 0, 0, 0, 0], float))
    assert (mean, recall, decay) == (0.5, 0.5, 1.0)  # bins [0:3] and [5:8]
    gt = np.stack([_square((10, 10), 2, 6, 2, 6).astype(np.uint8)] * 3)
    res = np.stack([_square((10, 10), 2, 6, 5, 9).astype(np.uint8)] * 3)
    (obj,) = evaluate_sequence("toy", gt, res)
    np.testing.assert_allclose(obj.j, [1 / 7] * 3)
    np.testing.assert_allclose(obj.f, [9 / 16] * 3)
    with pytest.raises(DitfError, match="label 2"):
        evaluate_sequence("toy", gt, res * 2)


def test_evaluate_results_layout(demo, tmp_path):
    seqs = get_dataset("davis", demo).sequences()
    perfect = tmp_path / "perfect"
    for seq in seqs:
        (perfect / seq.name).mkdir(parents=True)
        for mask in seq.gt_masks[1:-1]:  # first and last frame are not needed
            shutil.copy(mask, perfect / seq.name / mask.name)
    result = evaluate_results(seqs, perfect)
    assert [o.name for o in result.objects] == [
        "demo-disc_1",
        "demo-pair_1",
        "demo-pair_2",
    ]
    assert result.global_scores()["J&F-Mean"] == 1.0
    assert result.per_sequence()["demo-pair"]["objects"] == 2
    json.dumps(result.to_dict())
    # a result that loses object 2 everywhere scores it with empty masks (J = F = 0 there)
    lost = tmp_path / "lost"
    shutil.copytree(perfect, lost)
    for png in (lost / "demo-pair").glob("*.png"):
        labels, palette = read_mask(png, with_palette=True)
        write_mask(png, np.where(labels == 2, 0, labels), palette)
    scores = evaluate_results(seqs, lost).per_object()
    assert scores["demo-pair_2"]["J-Mean"] == 0.0 and scores["demo-pair_1"]["J-Mean"] == 1.0
    # the report is in percent, as the paper: J&F 100, not 1
    report = evaluate_results(seqs, lost).to_dict()
    assert report["unit"] == "percent" and report["per_object"]["demo-pair_1"]["J-Mean"] == 100.0
    assert report["global"]["J&F-Mean"] == pytest.approx(100 * evaluate_results(seqs, lost).global_scores()["J&F-Mean"])
    assert report["per_sequence"]["demo-pair"]["objects"] == 2
    (lost / "demo-pair" / "00003.png").unlink()
    with pytest.raises(DitfError, match="00003.png is missing"):
        evaluate_results(seqs, lost)
    (perfect / RUN_MARKER).write_text(json.dumps({"status": "running"}))
    with pytest.raises(DitfError, match="unfinished"):
        evaluate_results(seqs, perfect)


def test_metrics_do_not_import_torch():
    code = "import sys, ditf_pipeline.score.davis_metrics, ditf_pipeline.datasets.davis; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- propagation --------------------------------------------------------------------------------
def _dino_reference(target, sources, masks, radius, topk, temperature):
    """DINO's label_propagation, transcribed: dense affinity, restrict_neighborhood, top-k."""
    h, w, dim = target.shape
    feat_tar = F.normalize(target.reshape(h * w, dim), dim=1, p=2)  # hw x D
    feat_sources = F.normalize(torch.stack([s.reshape(h * w, dim).T for s in sources]), dim=1, p=2)  # n x D x hw
    n = len(sources)
    aff = torch.exp(torch.bmm(feat_tar.unsqueeze(0).repeat(n, 1, 1), feat_sources) / temperature)
    if radius > 0:
        mask = torch.zeros(h, w, h, w)
        for i in range(h):
            for j in range(w):
                mask[
                    i,
                    j,
                    max(0, i - radius) : i + radius + 1,
                    max(0, j - radius) : j + radius + 1,
                ] = 1
        aff *= mask.reshape(h * w, h * w).unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.stack(masks)  # n x C x h x w
    c = segs.shape[1]
    segs = segs.reshape(n, c, -1).transpose(2, 1).reshape(-1, c).T
    return torch.mm(segs, aff).reshape(c, h, w)


@pytest.mark.parametrize("radius,tile", [(2, 3), (3, 16), (0, 4)])
def test_windowed_propagation_equals_dino_dense(radius, tile, one_thread):
    gen = torch.Generator().manual_seed(radius)
    h, w, dim, n, c = 9, 11, 6, 3, 3
    target = torch.randn(h, w, dim, generator=gen)
    sources = [torch.randn(h, w, dim, generator=gen) for _ in range(n)]
    masks = [torch.softmax(torch.randn(c, h, w, generator=gen), dim=0) for _ in range(n)]
    settings = PropagationSettings(radius=radius, topk=5, temperature=0.1, tile=tile)
    ours = propagate_step(
        F.normalize(target, dim=-1),
        [F.normalize(s, dim=-1) for s in sources],
        masks,
        settings,
    )
    ref = _dino_reference(target, sources, masks, radius, 5, 0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _colour_features(path: Path) -> torch.Tensor:
    """The frame's own pixel colours in [-0.5, 0.5], average-pooled to STRIDE x STRIDE cells."""
    rgb = np.asarray(load_rgb(path), dtype=np.float32) / 255.0 - 0.5
    h, w, _ = rgb.shape
    rgb = rgb[: h // STRIDE * STRIDE, : w // STRIDE * STRIDE]
    return torch.from_numpy(rgb.reshape(h // STRIDE, STRIDE, w // STRIDE, STRIDE, 3).mean(axis=(1, 3)))


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_propagation_on_moving_shapes_reaches_high_jf(demo, tmp_path, one_thread):
    ds = get_dataset("davis", demo)
    seqs = ds.sequences()
    paths = {r.key: r.path for r in ds.images()}
    settings = PropagationSettings(upsample_factor=STRIDE)  # T=0.1, top-5, 7 last, radius 12
    out = propagate_davis(seqs, lambda key: _colour_features(paths[key]), tmp_path / "res", settings)
    for seq in seqs:
        written = sorted(p.name for p in (out / seq.name).iterdir())
        assert written == [f"{name}.png" for name in seq.frame_names]
        with Image.open(out / seq.name / "00004.png") as img:
            assert img.mode == "P" and img.size == (192, 128)
            assert img.getpalette()[:9] == davis_palette()[:3].reshape(-1).tolist()
    assert json.loads((out / RUN_MARKER).read_text())["status"] == "complete"
    result = evaluate_results(seqs, out)
    scores = result.global_scores()
    assert scores["J&F-Mean"] > 0.9, result.per_object()
    assert min(o["J-Mean"] for o in result.per_object().values()) > 0.85

    # never reuse stale results: a second run needs overwrite, which replaces every frame
    cheap = PropagationSettings(upsample_factor=STRIDE, radius=1, topk=1, n_last=1)
    with pytest.raises(DitfError, match="not empty"):
        propagate_davis(seqs, lambda key: _colour_features(paths[key]), out, cheap)
    stale = out / "demo-disc" / "stale.png"
    stale.write_bytes(b"old")
    propagate_davis(seqs[:1], lambda key: _colour_features(paths[key]), out, cheap, overwrite=True)
    assert not stale.exists() and not (out / "demo-pair").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(DitfError, match="refusing to overwrite"):
        propagate_davis(
            seqs,
            lambda key: _colour_features(paths[key]),
            foreign,
            cheap,
            overwrite=True,
        )
    assert (foreign / "keep.txt").exists()
