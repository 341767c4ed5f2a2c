"""Readers against hand-written fixtures in the real SPair-71k format, and the folder reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditf_pipeline.datasets import dataset_names, get_dataset
from ditf_pipeline.datasets.base import Dataset, Pair
from ditf_pipeline.core.errors import DitfError

PAIR = {
    "pair_id": 7,
    "src_imname": "2008_000033.jpg",
    "trg_imname": "2009_000111.jpg",
    "src_imsize": [500, 333, 3],
    "trg_imsize": [480, 360, 3],
    "src_bndbox": [210, 34, 475, 250],
    "trg_bndbox": [36, 92, 470, 200],
    "category": "aeroplane",
    "src_kps": [[212, 153], [300, 40]],
    "trg_kps": [[39, 145], [400, 199]],
    "kps_ids": ["0", "7"],
    "mirror": 0,
    "viewpoint_variation": 1,
    "scale_variation": 2,
    "truncation": 0,
    "occlusion": 3,
}
PAIR_NAME = "000007-2008_000033-2009_000111:aeroplane"


def _spair(root: Path, pairs: dict[str, dict | str], split: str = "test", layout: bool = True) -> Path:
    """Write pair files (dict -> JSON, str -> raw text) plus the images they name."""
    pair_dir = root / "PairAnnotation" / split
    pair_dir.mkdir(parents=True, exist_ok=True)
    for name, data in pairs.items():
        text = data if isinstance(data, str) else json.dumps(data)
        (pair_dir / f"{name}.json").write_text(text)
        if isinstance(data, dict) and isinstance(data.get("category"), str) and "/" not in data["category"]:
            for side in ("src", "trg"):
                imname = data.get(f"{side}_imname")
                if isinstance(imname, str) and "/" not in imname and ".." not in imname:
                    path = root / "JPEGImages" / data["category"] / imname
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (8, 6)).save(path)  # readers never open images
    if layout:
        (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
        (root / "Layout" / "large" / f"{split}.txt").write_text("\n".join(pairs) + "\n")
    return root


def test_registry_names_and_unknown():
    assert {"spair", "folder"} <= set(dataset_names())
    with pytest.raises(DitfError, match=r"unknown dataset 'spiar' \(did you mean 'spair'\?\); known datasets: .*folder.*spair"):
        get_dataset("spiar", ".")


def test_missing_root(tmp_path):
    with pytest.raises(DitfError, match=r"dataset root .*nope does not exist"):
        get_dataset("spair", tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DitfError, match="is not a directory"):
        get_dataset("folder", tmp_path / "file")


def test_unknown_option_is_ditf_error(tmp_path):
    with pytest.raises(DitfError, match="does not accept option"):
        get_dataset("folder", tmp_path, colour="red")


def test_spair_fixture_exact(tmp_path):
    root = _spair(tmp_path, {PAIR_NAME: PAIR})
    ds = get_dataset("spair", root)
    assert isinstance(ds, Dataset) and ds.split == "test"
    (pair,) = ds.pairs()
    assert isinstance(pair, Pair)
    assert pair.pair_id == PAIR_NAME
    assert pair.category == "aeroplane"
    assert (pair.src_key, pair.trg_key) == ("aeroplane/2008_000033", "aeroplane/2009_000111")
    assert pair.src_kps.dtype == np.float64 and pair.src_kps.shape == (2, 2)
    np.testing.assert_array_equal(pair.src_kps, [[212, 153], [300, 40]])
    np.testing.assert_array_equal(pair.trg_kps, [[39, 145], [400, 199]])
    assert pair.src_size == (500, 333) and pair.trg_size == (480, 360)
    assert pair.threshold_base == 434.0  # max(470 - 36, 200 - 92): DIFT's rule, no +1
    assert pair.trg_bbox == (36, 92, 470, 200)
    assert pair.extra["kps_ids"] == ["0", "7"] and pair.extra["occlusion"] == 3
    assert pair.extra["viewpoint_variation"] == 1 and pair.extra["pair_id"] == 7
    keys = [r.key for r in ds.images()]
    assert keys == ["aeroplane/2008_000033", "aeroplane/2009_000111"]
    assert ds.images()[0].path == root / "JPEGImages" / "aeroplane" / "2008_000033.jpg"
    assert ds.images()[0].category == "aeroplane"
    assert ds.category_of("aeroplane/2009_000111") == "aeroplane"
    assert ds.category_of("aeroplane/unknown") is None


def test_threshold_uses_height_when_taller(tmp_path):
    pair = dict(PAIR, trg_bndbox=[10, 5, 60, 305])
    (p,) = get_dataset("spair", _spair(tmp_path, {PAIR_NAME: pair})).pairs()
    assert p.threshold_base == 300.0


def test_glob_fallback_without_layout_and_other_split(tmp_path):
    other = dict(PAIR, src_imname="2010_000001.jpg", category="bus")
    root = _spair(tmp_path, {PAIR_NAME: PAIR, "000008-2010_000001-2009_000111:bus": other}, split="val", layout=False)
    ds = get_dataset("spair", root, split="val")
    assert [p.category for p in ds.pairs()] == ["aeroplane", "bus"]
    assert len(ds.images()) == 4  # same image name in two categories = two images
    only_bus = get_dataset("spair", root, split="val", category="bus")
    assert [p.category for p in only_bus.pairs()] == ["bus"]
    with pytest.raises(DitfError, match="no SPair-71k val pairs for category 'cow'"):
        get_dataset("spair", root, split="val", category="cow").pairs()


def test_layout_file_order_and_subset(tmp_path):
    second = dict(PAIR, src_kps=[[1, 1]], trg_kps=[[2, 2]], kps_ids=["3"])
    root = _spair(tmp_path, {"b:aeroplane": PAIR, "a:aeroplane": second})
    assert [p.pair_id for p in get_dataset("spair", root).pairs()] == ["b:aeroplane", "a:aeroplane"]
    (root / "Layout/large/test.txt").write_text("a:aeroplane\n\n")
    assert [p.pair_id for p in get_dataset("spair", root).pairs()] == ["a:aeroplane"]


def test_layout_names_missing_file(tmp_path):
    root = _spair(tmp_path, {PAIR_NAME: PAIR})
    (root / "Layout/large/test.txt").write_text(PAIR_NAME + "\nghost:cat\n")
    with pytest.raises(DitfError, match=r"test\.txt:2: pair annotation .*ghost:cat\.json does not exist"):
        get_dataset("spair", root).pairs()


def test_layout_path_traversal(tmp_path):
    root = _spair(tmp_path, {PAIR_NAME: PAIR})
    (root / "Layout/large/test.txt").write_text("../../secret\n")
    with pytest.raises(DitfError, match="must be a plain file name"):
        get_dataset("spair", root).pairs()


def test_bad_split_and_not_spair(tmp_path):
    with pytest.raises(DitfError, match="unknown SPair-71k split 'train'; choose one of trn, val, test"):
        get_dataset("spair", tmp_path, split="train")
    with pytest.raises(DitfError, match="does not look like SPair-71k"):
        get_dataset("spair", tmp_path)


def _broken(tmp_path, text_or_dict) -> str:
    root = _spair(tmp_path, {PAIR_NAME: text_or_dict})
    with pytest.raises(DitfError) as info:
        get_dataset("spair", root).pairs()
    message = str(info.value)
    assert "\n" not in message and f"{PAIR_NAME}.json" in message
    return message


def test_bad_json(tmp_path):
    assert "not valid JSON" in _broken(tmp_path, '{"src_imname": ')


def test_not_an_object(tmp_path):
    assert "expected a JSON object" in _broken(tmp_path, "[1, 2]")


@pytest.mark.parametrize("field", ["src_imname", "trg_imname", "src_imsize", "trg_imsize", "trg_bndbox", "src_kps", "trg_kps", "category"])
def test_missing_field(tmp_path, field):
    pair = {k: v for k, v in PAIR.items() if k != field}
    assert f"field {field!r} is missing" in _broken(tmp_path, pair)


def test_kps_length_mismatch(tmp_path):
    msg = _broken(tmp_path, dict(PAIR, trg_kps=[[1, 2]]))
    assert "'trg_kps' has 1 keypoints but src_kps has 2" in msg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"src_kps": [[1, 2], [3]]}, "src_kps"),
        ({"src_kps": [[1, 2], ["3", 4]]}, "src_kps"),
        ({"trg_kps": {"0": [1, 2]}}, "trg_kps"),
        ({"trg_kps": [[1, 2], [True, 4]]}, "trg_kps"),
        ({"src_imsize": [500]}, "src_imsize"),
        ({"trg_imsize": [0, 10, 3]}, "trg_imsize"),
        ({"trg_imsize": "480x360"}, "trg_imsize"),
        ({"trg_bndbox": [1, 2, 3]}, "trg_bndbox"),
        ({"trg_bndbox": [5, 5, 5, 5]}, "trg_bndbox"),
        ({"src_bndbox": [0, 0, "x", 1]}, "src_bndbox"),
        ({"src_imname": 33}, "src_imname"),
        ({"category": ""}, "category"),
        ({"kps_ids": ["0"]}, "kps_ids"),
        ({"src_kps": [], "trg_kps": []}, "src_kps"),
    ],
)
def test_wrong_types(tmp_path, change, field):
    assert f"field {field!r}" in _broken(tmp_path, dict(PAIR, **change))


@pytest.mark.parametrize(
    ("field", "value"),
    [("src_imname", "../../../etc/passwd"), ("trg_imname", "/etc/passwd"), ("category", ".."), ("category", "a/../../b"), ("trg_imname", "..\\x.jpg")],
)
def test_path_traversal(tmp_path, field, value):
    assert "must be a plain file name inside the dataset" in _broken(tmp_path, dict(PAIR, **{field: value}))


def test_missing_category_folder_and_image(tmp_path):
    root = _spair(tmp_path, {PAIR_NAME: PAIR})
    (root / "JPEGImages/aeroplane/2009_000111.jpg").unlink()
    with pytest.raises(DitfError, match=r"missing image .*2009_000111\.jpg \(needed by .*aeroplane\.json\)"):
        get_dataset("spair", root).images()
    for f in (root / "JPEGImages/aeroplane").iterdir():
        f.unlink()
    (root / "JPEGImages/aeroplane").rmdir()
    with pytest.raises(DitfError, match=r"missing category folder .*JPEGImages.aeroplane"):
        get_dataset("spair", root).images()
    assert len(get_dataset("spair", root).pairs()) == 1  # pairs need no images (scoring machine)


def test_folder_reader(tmp_path):
    for rel in ("b.png", "dogs/rex.JPG", "dogs/.hidden.jpg", "cats/tom.webp", "cats/deep/x.bmp", "notes.txt", ".git/y.png"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("hi")
        else:
            Image.new("RGB", (4, 4)).save(path, format={"webp": "WEBP", "bmp": "BMP"}.get(rel.rsplit(".", 1)[-1], "PNG"))
    ds = get_dataset("folder", tmp_path)
    records = ds.images()
    assert [r.key for r in records] == ["b", "cats/deep/x", "cats/tom", "dogs/rex"]
    assert [r.category for r in records] == [None, "deep", "cats", "dogs"]
    assert records[3].path == tmp_path / "dogs/rex.JPG"
    assert ds.pairs() == []
    assert ds.category_of("cats/tom") == "cats" and ds.category_of("b") is None


def test_folder_errors(tmp_path):
    with pytest.raises(DitfError, match="no images"):
        get_dataset("folder", tmp_path).images()
    with pytest.raises(DitfError, match="has no splits"):
        get_dataset("folder", tmp_path, split="test")
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "a.jpg")
    with pytest.raises(DitfError, match="two images share the key 'a'"):
        get_dataset("folder", tmp_path).images()
