"""The synthetic SPair-71k: real layout, exact correspondences, byte-identical per seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo.spair import KEYPOINT_NAMES, make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import load_rgb


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_spair_demo(tmp_path_factory.mktemp("demo") / "spair")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _patch(img: np.ndarray, x: float, y: float) -> np.ndarray:
    x, y = int(x), int(y)
    return img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(0)


def test_demo_deterministic(tmp_path):
    a = make_spair_demo(tmp_path / "a")
    b = make_spair_demo(tmp_path / "b")
    c = make_spair_demo(tmp_path / "c", seed=1)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert files_a == files_b
    assert files_a.keys() == files_c.keys() and files_a != files_c


def test_real_layout(demo):
    assert (demo / "Layout/large/test.txt").is_file()
    names = (demo / "Layout/large/test.txt").read_text().split()
    assert len(names) == 6
    for name in names:
        pair_id, src, trg_cat = name.split("-")
        trg, category = trg_cat.split(":")
        assert pair_id.isdigit()
        data = json.loads((demo / "PairAnnotation/test" / f"{name}.json").read_text())
        assert data["category"] == category and data["src_imname"] == f"{src}.jpg" and data["trg_imname"] == f"{trg}.jpg"
        for field in ("src_imsize", "trg_imsize", "src_bndbox", "trg_bndbox", "src_kps", "trg_kps", "kps_ids",
                      "mirror", "viewpoint_variation", "scale_variation", "truncation", "occlusion", "pair_id"):
            assert field in data, field
    for ann_path in (demo / "ImageAnnotation").rglob("*.json"):
        ann = json.loads(ann_path.read_text())
        img = load_rgb(demo / "JPEGImages" / ann_path.parent.name / ann["filename"])
        assert img.size == (ann["image_width"], ann["image_height"])
        assert set(ann["kps"]) == {str(i) for i in range(len(KEYPOINT_NAMES))}
        assert len(ann["bndbox"]) == 4 and isinstance(ann["azimuth_id"], int)


def test_reader_and_annotations_agree(demo):
    ds = get_dataset("spair", demo)
    pairs = ds.pairs()
    assert len(pairs) == 6 and {p.category for p in pairs} == {"cat", "car"}
    assert len(ds.images()) == 6
    sizes = set()
    for pair in pairs:
        anns = {}
        for side in ("src", "trg"):
            key = getattr(pair, f"{side}_key")
            anns[side] = json.loads((demo / "ImageAnnotation" / f"{key}.json").read_text())
            assert getattr(pair, f"{side}_size") == (anns[side]["image_width"], anns[side]["image_height"])
            sizes.add(getattr(pair, f"{side}_size"))
        ids = pair.extra["kps_ids"]
        both = [str(i) for i in range(len(KEYPOINT_NAMES)) if anns["src"]["kps"][str(i)] and anns["trg"]["kps"][str(i)]]
        assert ids == both and len(ids) >= 4  # only keypoints visible in both, in id order
        np.testing.assert_array_equal(pair.src_kps, [anns["src"]["kps"][i] for i in ids])
        np.testing.assert_array_equal(pair.trg_kps, [anns["trg"]["kps"][i] for i in ids])
        x1, y1, x2, y2 = anns["trg"]["bndbox"]
        assert pair.threshold_base == max(x2 - x1, y2 - y1)
        assert np.all((pair.trg_kps >= [x1, y1]) & (pair.trg_kps <= [x2, y2]))
    assert len(sizes) > 1  # source and target sizes differ somewhere
    assert any(p.extra["mirror"] for p in pairs) and not all(p.extra["mirror"] for p in pairs)


def test_correspondences_show_the_same_part(demo):
    """Colour at src_kps[i] matches trg_kps[i], and differs from other parts: exact ground truth."""
    ds = get_dataset("spair", demo)
    images = {r.key: np.asarray(load_rgb(r.path)) for r in ds.images()}
    for pair in ds.pairs():
        src, trg = images[pair.src_key], images[pair.trg_key]
        for i, (s, t) in enumerate(zip(pair.src_kps, pair.trg_kps)):
            assert np.abs(_patch(src, *s) - _patch(trg, *t)).max() < 40, (pair.pair_id, i)
        # a shuffled correspondence must look wrong for at least most keypoints
        shifted = np.roll(pair.trg_kps, 1, axis=0)
        wrong = [np.abs(_patch(src, *s) - _patch(trg, *t)).max() > 60 for s, t in zip(pair.src_kps, shifted)]
        assert sum(wrong) >= len(wrong) - 2


def test_mirror_pairs_flip_asymmetric_part(demo):
    """Part 3 is blue on its left half, orange on its right; a mirror pair swaps that."""
    ds = get_dataset("spair", demo)
    images = {r.key: np.asarray(load_rgb(r.path)).astype(int) for r in ds.images()}
    checked = 0
    for pair in ds.pairs():
        if "3" not in pair.extra["kps_ids"]:
            continue
        k = pair.extra["kps_ids"].index("3")
        sides = []
        for key, (x, y) in ((pair.src_key, pair.src_kps[k]), (pair.trg_key, pair.trg_kps[k])):
            img = images[key]
            left, right = img[int(y), int(x) - 2], img[int(y), int(x) + 2]
            sides.append("blue-left" if left[2] > left[0] and right[0] > right[2] else "orange-left")
        assert (sides[0] != sides[1]) == bool(pair.extra["mirror"]), pair.pair_id
        checked += 1
    assert checked >= 4


def test_options_and_refusals(tmp_path):
    root = make_spair_demo(tmp_path / "d", categories=("dog",), pairs_per_category=4, image_size=(128, 96), seed=3)
    ds = get_dataset("spair", root)
    assert len(ds.pairs()) == 4 and len(ds.images()) == 4  # 4 images give 6 >= 4 pairs
    assert ds.pairs()[0].src_size == (128, 96)
    with pytest.raises(DitfError, match="not empty"):
        make_spair_demo(root)
    assert make_spair_demo(root, overwrite=True, seed=3) == root
    assert {p.category for p in get_dataset("spair", root, split="test").pairs()} == {"cat", "car"}
    assert not (root / "JPEGImages/dog").exists()  # overwrite removed the old run
    with pytest.raises(DitfError, match="bad category"):
        make_spair_demo(tmp_path / "e", categories=("../x",))


def test_left_right_ids_follow_spair_semantics(demo):
    """SPair names parts by the object's own left/right, so after a mirror the *label* of a
    symmetric part stays on the same side of the body axis (ids 1, 4 right of the axis, 2, 5 left)."""
    flips = set()
    for ann_path in (demo / "ImageAnnotation").rglob("*.json"):
        ann = json.loads(ann_path.read_text())
        kps = ann["kps"]
        axis = next(kps[i][0] for i in ("0", "3", "7") if kps[i])
        for right, left in (("1", "2"), ("4", "5")):
            if kps[right]:
                assert kps[right][0] > axis, ann_path
            if kps[left]:
                assert kps[left][0] < axis, ann_path
        flips.add(ann["azimuth_id"])
    assert len(flips) == 2  # both flipped and unflipped images were checked
