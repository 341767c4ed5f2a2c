"""AP-10K benchmark reader (GeoAware-SC layout): demo data and hand-written fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditf_pipeline.datasets import dataset_names, get_dataset
from ditf_pipeline.demo import demo_names, make_demo
from ditf_pipeline.demo.ap10k import PART_TO_SLOT, make_ap10k_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import load_rgb


def _kps(points: dict[int, tuple[float, float, int]]) -> list[float]:
    flat = [0] * 51
    for slot, (x, y, v) in points.items():
        flat[3 * slot : 3 * slot + 3] = [x, y, v]
    return flat


# A merged record exactly as prepare_ap10k.ipynb writes it: {**annotation, **image, name, supercategory}.
SRC = {
    "id": 6101, "image_id": 6101, "category_id": 7, "bbox": [12, 30, 300, 200], "area": 60000,
    "iscrowd": 0, "num_keypoints": 4, "license": 1, "file_name": "000000006101.jpg", "width": 640,
    "height": 480, "background": 2, "name": "cat", "supercategory": "Felidae",
    "keypoints": _kps({0: (50, 60, 2), 2: (70, 80, 2), 5: (90, 100, 2), 16: (5.5, 6.5, 2)}),
}  # fmt: skip
TRG = dict(
    SRC, id=7202, image_id=7202, file_name="000000007202.jpg", width=500, height=375, bbox=[100, 50, 80, 120],
    keypoints=_kps({0: (1, 2, 2), 1: (3, 4, 2), 5: (0, 0, 2), 16: (7, 8, 2), 2: (9, 9, 0)}),
)
SRC_JSON = "data/ap-10k/ImageAnnotation/Felidae/cat/000000006101.json"
TRG_JSON = "data/ap-10k/ImageAnnotation/Felidae/cat/000000007202.json"
PAIR_NAME = "000000006101-000000007202:cat"


def _ap10k(root: Path, pairs: dict[str, dict | str], folder: str = "test", annotations=None) -> Path:
    annotations = {SRC_JSON: SRC, TRG_JSON: TRG} if annotations is None else annotations
    for rel, data in annotations.items():
        tail = rel.split("ImageAnnotation/", 1)[1]
        path = root / "ImageAnnotation" / tail
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        image = (root / "JPEGImages" / tail).with_suffix(".jpg")
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6)).save(image)  # readers never open images
    pair_dir = root / "PairAnnotation" / folder
    pair_dir.mkdir(parents=True, exist_ok=True)
    for name, data in pairs.items():
        (pair_dir / f"{name}.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return root


PAIR = {"src_json_path": SRC_JSON, "trg_json_path": TRG_JSON}


# -- demo ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_ap10k_demo(tmp_path_factory.mktemp("demo") / "ap-10k")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _patch(img: np.ndarray, x: float, y: float) -> np.ndarray:
    x, y = int(x), int(y)
    return img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(0)


def test_registered_and_demo_dispatch(tmp_path):
    assert "ap10k" in dataset_names() and "ap10k" in demo_names()
    root = make_demo("ap10k", tmp_path / "d", species={"Bovidae": ("cow",)}, images_per_species=2)
    assert [p.category for p in get_dataset("ap10k", root).pairs()] == ["cow"]
    with pytest.raises(DitfError, match="no AP-10K test_cross_family pairs"):  # one family: no cross pairs
        get_dataset("ap10k", root, split="cross-family").pairs()


def test_demo_deterministic(tmp_path):
    a = make_ap10k_demo(tmp_path / "a")
    files_a, files_b = _files(a), _files(make_ap10k_demo(tmp_path / "b"))
    files_c = _files(make_ap10k_demo(tmp_path / "c", seed=1))
    assert files_a == files_b and files_a.keys() == files_c.keys() and files_a != files_c


def test_demo_splits_and_categories(demo):
    intra = get_dataset("ap10k", demo)
    assert intra.split == "intra-species" and intra.folder == "test"
    assert sorted({p.category for p in intra.pairs()}) == ["cat", "dog", "lion"] and len(intra.pairs()) == 9
    assert all(p.src_key.split("/")[1] == p.trg_key.split("/")[1] == p.category for p in intra.pairs())
    cross_species = get_dataset("ap10k", demo, split="cross-species").pairs()
    assert [p.category for p in cross_species] == ["Felidae", "Felidae"]
    assert all(p.extra["src_species"] != p.extra["trg_species"] for p in cross_species)
    cross_family = get_dataset("ap10k", demo, split="cross-family").pairs()
    assert [p.category for p in cross_family] == ["all", "all"]
    assert all(p.extra["src_family"] != p.extra["trg_family"] for p in cross_family)
    ds = get_dataset("ap10k", demo, split="cross-family")
    assert [r.category for r in ds.images()] == ["dog", "dog", "cat"]  # category = species (prompt)
    assert ds.category_of("Felidae/cat/000000000001") == "cat"


def test_demo_reader_matches_annotations(demo):
    ds = get_dataset("ap10k", demo)
    for pair in ds.pairs():
        pair_json = json.loads(Path(pair.extra["annotation"]).read_text())
        assert pair_json.keys() == {"src_json_path", "trg_json_path"}
        assert pair_json["src_json_path"].startswith("data/ap-10k/ImageAnnotation/")
        src = json.loads(Path(pair.extra["src_json"]).read_text())
        trg = json.loads(Path(pair.extra["trg_json"]).read_text())
        sk, tk = np.reshape(src["keypoints"], (17, 3)), np.reshape(trg["keypoints"], (17, 3))
        ids = [i for i in range(17) if sk[i, 2] > 0 and tk[i, 2] > 0]
        assert pair.extra["kps_ids"] == [str(i) for i in ids] and len(ids) >= 3
        np.testing.assert_array_equal(pair.src_kps, sk[ids, :2])
        np.testing.assert_array_equal(pair.trg_kps, tk[ids, :2])
        x, y, w, h = trg["bbox"]
        assert pair.threshold_base == max(w, h) and pair.trg_bbox == (x, y, x + w, y + h)
        assert pair.trg_size == (trg["width"], trg["height"])
    for record in ds.images():
        ann = json.loads((demo / "ImageAnnotation" / f"{record.key}.json").read_text())
        assert load_rgb(record.path).size == (ann["width"], ann["height"])
        assert ann["file_name"] == record.path.name and set(ann["keypoints"][2::3]) <= {0, 2}
    # every demo part lands in its AP-10K slot; the other 9 slots are never visible
    unused = set(range(17)) - set(PART_TO_SLOT)
    assert not any(int(i) in unused for p in ds.pairs() for i in p.extra["kps_ids"])


def test_demo_correspondences_show_the_same_part(demo):
    for split in ("intra-species", "cross-species", "cross-family"):
        ds = get_dataset("ap10k", demo, split=split)
        images = {r.key: np.asarray(load_rgb(r.path)) for r in ds.images()}
        for pair in ds.pairs():
            src, trg = images[pair.src_key], images[pair.trg_key]
            for s, t in zip(pair.src_kps, pair.trg_kps):
                assert np.abs(_patch(src, *s) - _patch(trg, *t)).max() < 40, pair.pair_id
            shifted = np.roll(pair.trg_kps, 1, axis=0)
            wrong = [np.abs(_patch(src, *s) - _patch(trg, *t)).max() > 60 for s, t in zip(pair.src_kps, shifted)]
            assert sum(wrong) >= len(wrong) - 2


def test_demo_refusals(tmp_path):
    root = make_ap10k_demo(tmp_path / "d", species={"Ursidae": ("brown bear",)}, images_per_species=2)
    with pytest.raises(DitfError, match="not empty"):
        make_ap10k_demo(root)
    make_ap10k_demo(root, overwrite=True)
    assert not (root / "ImageAnnotation" / "Ursidae").exists()
    with pytest.raises(DitfError, match="bad family/species name"):
        make_ap10k_demo(tmp_path / "e", species={"../x": ("cat",)})


# -- hand-written fixtures ----------------------------------------------------------------------
def test_fixture_exact(tmp_path):
    root = _ap10k(tmp_path, {PAIR_NAME: PAIR})
    ds = get_dataset("ap10k", root)
    assert ds.alphas == (0.01, 0.05, 0.1) and ds.primary_aggregation == "per_image"
    (pair,) = ds.pairs()
    assert pair.pair_id == PAIR_NAME and pair.category == "cat"
    assert (pair.src_key, pair.trg_key) == ("Felidae/cat/000000006101", "Felidae/cat/000000007202")
    # visible in both (v > 0): slots 0, 5, 16; slot 1/2 are visible on one side only; order kept
    assert pair.extra["kps_ids"] == ["0", "5", "16"]
    np.testing.assert_array_equal(pair.src_kps, [[50, 60], [90, 100], [5.5, 6.5]])
    np.testing.assert_array_equal(pair.trg_kps, [[1, 2], [0, 0], [7, 8]])
    assert pair.src_kps.dtype == np.float64
    assert pair.src_size == (640, 480) and pair.trg_size == (500, 375)
    assert pair.threshold_base == 120.0  # max(w=80, h=120) of the target bbox [x, y, w, h]
    assert pair.trg_bbox == (100, 50, 180, 170)
    assert pair.extra["trg_file_name"] == "000000007202.jpg" and pair.extra["src_supercategory"] == "Felidae"
    (first, second) = ds.images()
    assert first.key == "Felidae/cat/000000006101" and first.category == "cat"
    assert first.path == root / "JPEGImages" / "Felidae" / "cat" / "000000006101.jpg"
    assert ds.category_of("Felidae/cat/000000007202") == "cat" and ds.category_of("Felidae/cat/1") is None


def test_threshold_uses_width_when_wider(tmp_path):
    trg = dict(TRG, bbox=[0.5, 7, 250.5, 10])
    root = _ap10k(tmp_path, {PAIR_NAME: PAIR}, annotations={SRC_JSON: SRC, TRG_JSON: trg})
    (pair,) = get_dataset("ap10k", root).pairs()
    assert pair.threshold_base == 250.5 and pair.trg_bbox == (0.5, 7, 251.0, 17)


@pytest.mark.parametrize(
    "prefix", ["data/ap-10k/ImageAnnotation", "/abs/elsewhere/ap-10k/ImageAnnotation", "ImageAnnotation",
               "data\\ap-10k\\ImageAnnotation", "x/ImageAnnotation/y/ImageAnnotation"],
)
def test_json_paths_are_rebuilt_under_root(tmp_path, prefix):
    pair = {k: v.replace("data/ap-10k/ImageAnnotation", prefix) for k, v in PAIR.items()}
    (p,) = get_dataset("ap10k", _ap10k(tmp_path, {PAIR_NAME: pair})).pairs()
    assert p.extra["src_json"] == str(tmp_path / "ImageAnnotation/Felidae/cat/000000006101.json")


def test_splits_and_category_option(tmp_path):
    root = _ap10k(tmp_path, {"000000006101-000000007202:Felidae": PAIR}, folder="test_cross_species")
    _ap10k(root, {"000000006101-000000007202:all": PAIR}, folder="val_cross_family")
    assert [p.category for p in get_dataset("ap10k", root, split="cross-species").pairs()] == ["Felidae"]
    assert [p.category for p in get_dataset("ap10k", root, split="val_cross_family").pairs()] == ["all"]
    with pytest.raises(DitfError, match=r"does not look like the AP-10K benchmark: .*PairAnnotation.test does not exist"):
        get_dataset("ap10k", root)
    with pytest.raises(DitfError, match="unknown AP-10K split 'intra'; choose one of intra-species, cross-species, cross-family"):
        get_dataset("ap10k", root, split="intra")
    _ap10k(root, {PAIR_NAME: PAIR, "000000007202-000000006101:lion": dict(src_json_path=TRG_JSON, trg_json_path=SRC_JSON)})
    assert [p.category for p in get_dataset("ap10k", root).pairs()] == ["cat", "lion"]  # sorted file names
    assert [p.category for p in get_dataset("ap10k", root, category="lion").pairs()] == ["lion"]
    with pytest.raises(DitfError, match="no AP-10K test pairs for category 'dog'"):
        get_dataset("ap10k", root, category="dog").pairs()


def _broken(tmp_path, pair=PAIR, src=SRC, trg=TRG, name=PAIR_NAME) -> str:
    root = _ap10k(tmp_path, {name: pair}, annotations={SRC_JSON: src, TRG_JSON: trg})
    with pytest.raises(DitfError) as info:
        get_dataset("ap10k", root).pairs()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ('{"src_json_path": ', "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ({"src_json_path": SRC_JSON}, "field 'trg_json_path' is missing"),
        (dict(PAIR, src_json_path=5), "field 'src_json_path' must be a non-empty string"),
    ],
)
def test_malformed_pair_file(tmp_path, pair, expected):
    message = _broken(tmp_path, pair=pair)
    assert expected in message and f"{PAIR_NAME}.json" in message


def test_pair_file_name_needs_category(tmp_path):
    assert "must end in ':<category>.json'" in _broken(tmp_path, name="000000006101-000000007202")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bbox": [1, 2, 3]}, "bbox"),
        ({"bbox": [1, 2, -3, 4]}, "bbox"),
        ({"bbox": [1, 2, 0, 0]}, "bbox"),
        ({"bbox": [1, 2, True, 4]}, "bbox"),
        ({"keypoints": [0] * 50}, "keypoints"),
        ({"keypoints": [0] * 50 + ["2"]}, "keypoints"),
        ({"keypoints": _kps({0: (1, 1, -2)})}, "keypoints"),
        ({"width": 0}, "width"),
        ({"height": 10.5}, "height"),
        ({"width": "640"}, "width"),
    ],
)
def test_malformed_image_annotation(tmp_path, change, field):
    message = _broken(tmp_path, trg=dict(TRG, **change))
    assert f"field {field!r}" in message and "000000007202.json" in message


@pytest.mark.parametrize("field", ["bbox", "keypoints", "width", "height"])
def test_missing_image_annotation_field(tmp_path, field):
    message = _broken(tmp_path, src={k: v for k, v in SRC.items() if k != field})
    assert f"000000006101.json: field {field!r} is missing" in message


def test_image_annotation_not_json_or_missing(tmp_path):
    assert "000000007202.json: not valid JSON" in _broken(tmp_path / "a", trg="{")
    message = _broken(tmp_path / "b", pair=dict(PAIR, trg_json_path=TRG_JSON.replace("7202", "9999")))
    assert "000000009999.json does not exist" in message and f"{PAIR_NAME}.json" in message


def test_no_mutual_keypoint(tmp_path):
    trg = dict(TRG, keypoints=_kps({1: (3, 4, 2)}))
    assert "no keypoint is visible in both" in _broken(tmp_path, trg=trg)


@pytest.mark.parametrize(
    "path",
    [
        "data/ap-10k/ImageAnnotation/../../../etc/passwd.json",
        "data/ap-10k/ImageAnnotation/Felidae/../../secret.json",
        "data/ap-10k/ImageAnnotation/Felidae/cat/../000000006101.json",
        "data/ap-10k/ImageAnnotation/../../000000006101.json",  # 3 components, would leave the root
        "ImageAnnotation/Felidae/./000000006101.json",
        "ImageAnnotation/Felidae/ /000000006101.json",
        "/etc/passwd",
        "data/ap-10k/ImageAnnotation/Felidae/cat/sub/000000006101.json",
        "data/ap-10k/ImageAnnotation/Felidae/000000006101.json",
        "data/ap-10k/ImageAnnotation/Felidae/cat/000000006101.jpg",
        "data/ap-10k/ImageAnnotation/Felidae/cat/",
    ],
)
def test_path_traversal_refused(tmp_path, path):
    message = _broken(tmp_path, pair=dict(PAIR, src_json_path=path))
    assert "field 'src_json_path' must be a path .../ImageAnnotation/<family>/<species>/<id>.json" in message
    assert f"{PAIR_NAME}.json" in message


def test_missing_image(tmp_path):
    root = _ap10k(tmp_path, {PAIR_NAME: PAIR})
    (root / "JPEGImages/Felidae/cat/000000007202.jpg").unlink()
    assert len(get_dataset("ap10k", root).pairs()) == 1  # pairs need no images (scoring machine)
    with pytest.raises(DitfError, match=r"missing image .*000000007202\.jpg \(annotation .*000000007202\.json\)"):
        get_dataset("ap10k", root).images()
