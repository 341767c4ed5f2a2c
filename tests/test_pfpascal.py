"""PF-Pascal reader: the demo data and hand-written fixtures in the real (weakalign / GeoAware) format."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditf_pipeline.datasets import dataset_names, get_dataset
from ditf_pipeline.datasets.pfpascal import CLASSES
from ditf_pipeline.demo import demo_names, make_demo
from ditf_pipeline.demo.pfpascal import make_pfpascal_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import load_rgb

HEADER = "source_image,target_image,class,XA,YA,XB,YB"
# Two rows in the public list's exact format (paths relative to the folder above PF-dataset-PASCAL).
ROW1 = "PF-dataset-PASCAL/JPEGImages/2009_002391.jpg,PF-dataset-PASCAL/JPEGImages/2010_001574.jpg,1,12;200.5;1,30;40;1,100;150;7,20;21;1"
ROW2 = "PF-dataset-PASCAL/JPEGImages/2008_000033.jpg,PF-dataset-PASCAL/JPEGImages/2010_001574.jpg,20,5;6,7;8,9;10,11;12"
SIZES = {"2009_002391": (500, 375), "2010_001574": (333, 500), "2008_000033": (640, 480)}


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


def _pf(root: Path, rows=(ROW1, ROW2), split_file: str = "test_pairs_pf_pascal.csv", header: str = HEADER) -> Path:
    """GeoAware layout: root = PF-dataset-PASCAL with the CSVs and a flat JPEGImages."""
    root.mkdir(parents=True, exist_ok=True)
    (root / split_file).write_text("\n".join([header, *rows]) + "\n")
    for stem, size in SIZES.items():
        _image(root / "JPEGImages" / f"{stem}.jpg", size)
    return root


# -- demo ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_pfpascal_demo(tmp_path_factory.mktemp("demo") / "PF-dataset-PASCAL")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _patch(img: np.ndarray, x: float, y: float) -> np.ndarray:
    x, y = int(x), int(y)
    return img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(0)


def test_registered_and_demo_dispatch(tmp_path):
    assert "pfpascal" in dataset_names() and "pfpascal" in demo_names()
    root = make_demo("pfpascal", tmp_path / "d", categories=("dog",), pairs_per_category=1)
    assert [p.category for p in get_dataset("pfpascal", root).pairs()] == ["dog"]


def test_demo_deterministic(tmp_path):
    a = make_pfpascal_demo(tmp_path / "a")
    files_a, files_b = _files(a), _files(make_pfpascal_demo(tmp_path / "b"))
    files_c = _files(make_pfpascal_demo(tmp_path / "c", seed=1))
    assert files_a == files_b and files_a.keys() == files_c.keys() and files_a != files_c


def test_demo_real_layout_and_reader(demo):
    with open(demo / "test_pairs_pf_pascal.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert ",".join(rows[0]) == HEADER and len(rows) == 7
    assert all(r[0].startswith("PF-dataset-PASCAL/JPEGImages/") for r in rows[1:])
    ds = get_dataset("pfpascal", demo)
    assert ds.split == "test" and ds.alphas == (0.05, 0.1, 0.15)
    pairs = ds.pairs()
    assert [p.category for p in pairs] == ["cat"] * 3 + ["car"] * 3
    for row, pair in zip(rows[1:], pairs):
        assert CLASSES[int(row[2]) - 1] == pair.category
        np.testing.assert_array_equal(pair.src_kps[:, 0], [float(v) for v in row[3].split(";")])
        np.testing.assert_array_equal(pair.trg_kps[:, 1], [float(v) for v in row[6].split(";")])
    records = {r.key: r for r in ds.images()}
    assert len(records) == 6 and all(r.category == r.key.split("/")[0] for r in records.values())
    for pair in pairs:
        trg = load_rgb(records[pair.trg_key].path)
        assert pair.trg_size == trg.size and pair.src_size == load_rgb(records[pair.src_key].path).size
        assert pair.threshold_base == max(trg.size) and pair.trg_bbox is None
    assert len({p.trg_size for p in pairs}) > 1


def test_demo_correspondences_show_the_same_part(demo):
    ds = get_dataset("pfpascal", demo)
    images = {r.key: np.asarray(load_rgb(r.path)) for r in ds.images()}
    for pair in ds.pairs():
        src, trg = images[pair.src_key], images[pair.trg_key]
        for s, t in zip(pair.src_kps, pair.trg_kps):
            assert np.abs(_patch(src, *s) - _patch(trg, *t)).max() < 40, pair.pair_id
        shifted = np.roll(pair.trg_kps, 1, axis=0)
        wrong = [np.abs(_patch(src, *s) - _patch(trg, *t)).max() > 60 for s, t in zip(pair.src_kps, shifted)]
        assert sum(wrong) >= len(wrong) - 2


def test_demo_refusals(tmp_path):
    root = make_pfpascal_demo(tmp_path / "d", categories=("sofa",), pairs_per_category=1)
    with pytest.raises(DitfError, match="not empty"):
        make_pfpascal_demo(root)
    make_pfpascal_demo(root, overwrite=True)
    assert {p.category for p in get_dataset("pfpascal", root).pairs()} == {"cat", "car"}
    with pytest.raises(DitfError, match="bad category 'tiger'"):
        make_pfpascal_demo(tmp_path / "e", categories=("tiger",))


# -- hand-written fixtures ----------------------------------------------------------------------
def test_fixture_exact(tmp_path):
    root = _pf(tmp_path / "PF-dataset-PASCAL")
    ds = get_dataset("pfpascal", root)
    first, second = ds.pairs()
    assert first.pair_id == "0001-2009_002391-2010_001574:aeroplane"
    assert (first.category, second.category) == ("aeroplane", "tvmonitor")
    assert (first.src_key, first.trg_key) == ("aeroplane/2009_002391", "aeroplane/2010_001574")
    # coordinates exactly as stored: no 1-based shift, no rounding, no filtering (the (1, 1) point stays)
    np.testing.assert_array_equal(first.src_kps, [[12, 30], [200.5, 40], [1, 1]])
    np.testing.assert_array_equal(first.trg_kps, [[100, 20], [150, 21], [7, 1]])
    assert first.src_kps.dtype == np.float64
    assert first.src_size == (500, 375) and first.trg_size == (333, 500)
    assert first.threshold_base == 500.0  # max(H, W) of the TARGET image (taller than wide)
    assert second.threshold_base == 500.0 and second.src_size == (640, 480)  # not the larger source
    assert first.extra["class"] == 1 and first.extra["annotation"].endswith("test_pairs_pf_pascal.csv:2")
    keys = [r.key for r in ds.images()]
    assert keys == ["aeroplane/2009_002391", "aeroplane/2010_001574", "tvmonitor/2008_000033", "tvmonitor/2010_001574"]
    assert ds.images()[0].path == root / "JPEGImages" / "2009_002391.jpg"
    assert ds.category_of("tvmonitor/2008_000033") == "tvmonitor" and ds.category_of("cat/x") is None
    assert [p.category for p in get_dataset("pfpascal", root, category="tvmonitor").pairs()] == ["tvmonitor"]
    with pytest.raises(DitfError, match="no PF-Pascal test pairs for category 'cat'"):
        get_dataset("pfpascal", root, category="cat").pairs()
    with pytest.raises(DitfError, match="unknown PF-Pascal category 'kitten'"):
        get_dataset("pfpascal", root, category="kitten")


def test_threshold_uses_width_when_wider(tmp_path):
    root = _pf(tmp_path, rows=[ROW1.replace("2010_001574.jpg,1,", "2008_000033.jpg,1,")])
    (pair,) = get_dataset("pfpascal", root).pairs()
    assert pair.trg_size == (640, 480) and pair.threshold_base == 640.0


def test_weakalign_layouts(tmp_path):
    """Root above PF-dataset-PASCAL, with the CSV at the root or inside PF-dataset-PASCAL."""
    pf = _pf(tmp_path / "PF-dataset-PASCAL")
    for root in (tmp_path, None):
        if root is None:  # CSV inside the subfolder, root above it
            (tmp_path / "test_pairs_pf_pascal.csv").unlink()
            root = tmp_path
        else:
            (tmp_path / "test_pairs_pf_pascal.csv").write_text((pf / "test_pairs_pf_pascal.csv").read_text())
        ds = get_dataset("pfpascal", root)
        assert len(ds.pairs()) == 2
        assert ds.images()[0].path == tmp_path / "PF-dataset-PASCAL" / "JPEGImages" / "2009_002391.jpg"


def test_splits(tmp_path):
    root = _pf(tmp_path, rows=[ROW2], split_file="val_pairs_pf_pascal.csv")
    assert [p.category for p in get_dataset("pfpascal", root, split="val").pairs()] == ["tvmonitor"]
    with pytest.raises(DitfError, match=r"does not look like PF-Pascal \(test split\).*test_pairs_pf_pascal\.csv"):
        get_dataset("pfpascal", root)
    (root / "train_pairs_pf_pascal.csv").write_text(HEADER + "\n" + ROW1 + "\n")
    assert [p.category for p in get_dataset("pfpascal", root, split="trn").pairs()] == ["aeroplane"]
    (root / "trn_pairs_pf_pascal.csv").write_text(HEADER + "\n" + ROW2 + "\n")  # preferred name
    assert [p.category for p in get_dataset("pfpascal", root, split="trn").pairs()] == ["tvmonitor"]
    with pytest.raises(DitfError, match="unknown PF-Pascal split 'train'; choose one of test, val, trn"):
        get_dataset("pfpascal", root, split="train")


def test_weakalign_training_list_refused(tmp_path):
    root = _pf(tmp_path, rows=["PF-dataset-PASCAL/JPEGImages/2009_002391.jpg,PF-dataset-PASCAL/JPEGImages/2010_001574.jpg,1,0"],
               split_file="trn_pairs_pf_pascal.csv", header="source_image,target_image,class,flip")
    with pytest.raises(DitfError, match=r"trn_pairs_pf_pascal\.csv:1: header has 4 columns.*has no keypoints"):
        get_dataset("pfpascal", root, split="trn").pairs()


def _broken(tmp_path, rows, header=HEADER) -> str:
    root = _pf(tmp_path, rows=rows, header=header)
    with pytest.raises(DitfError) as info:
        get_dataset("pfpascal", root).pairs()
    message = str(info.value)
    assert "\n" not in message and "test_pairs_pf_pascal.csv" in message
    return message


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (ROW1.replace(",1,", ",0,"), "column 'class' must be an integer 1..20, got '0'"),
        (ROW1.replace(",1,", ",21,"), "column 'class' must be an integer 1..20"),
        (ROW1.replace(",1,", ",cat,"), "column 'class' must be an integer 1..20, got 'cat'"),
        (ROW1.replace(",1,", ",1.5,"), "column 'class' must be an integer 1..20"),
        (ROW1.replace(",1,", ",nan,"), "column 'class' must be an integer 1..20"),
        (ROW1.replace("12;200.5;1", "12;200.5"), "coordinate lists differ in length (XA 2, YA 3"),
        (ROW1.replace("100;150;7", "100;x;7"), "column 'XB' must be ';'-separated numbers"),
        (ROW1.replace("100;150;7", "100;inf;7"), "column 'XB' must hold finite numbers"),
        (ROW1.replace("20;21;1", "20;;1"), "column 'YB' must be ';'-separated numbers"),
        (ROW1.rsplit(",", 1)[0], "expected 7 columns"),
        ('"unterminated,' + ROW1, "expected 7 columns"),  # the quote swallows the row
    ],
)
def test_malformed_rows(tmp_path, row, expected):
    message = _broken(tmp_path, [row])
    assert expected in message and "test_pairs_pf_pascal.csv:2:" in message


def test_bad_header_and_empty(tmp_path):
    assert "first line must be the header" in _broken(tmp_path / "a", [ROW2], header=ROW1)
    assert "header has 3 columns" in _broken(tmp_path / "b", [ROW2], header="a,b,c")
    assert "no PF-Pascal test pairs" in _broken(tmp_path / "c", [])
    root = tmp_path / "d"
    root.mkdir()
    (root / "test_pairs_pf_pascal.csv").write_text("\n\n")
    with pytest.raises(DitfError, match="test_pairs_pf_pascal.csv: empty file"):
        get_dataset("pfpascal", root).pairs()


@pytest.mark.parametrize(
    "path",
    ["../secret.jpg", "PF-dataset-PASCAL/../../secret.jpg", "/etc/passwd", "C:/x.jpg",
     "PF-dataset-PASCAL\\JPEGImages\\2009_002391.jpg", "PF-dataset-PASCAL//JPEGImages/a.jpg", "./a.jpg", ""],
)
def test_path_traversal_refused(tmp_path, path):
    row = ROW1.replace("PF-dataset-PASCAL/JPEGImages/2009_002391.jpg", path, 1)
    assert "must be a relative path inside the dataset" in _broken(tmp_path, [row])


def test_missing_image_and_key_collision(tmp_path):
    root = _pf(tmp_path)
    (root / "JPEGImages" / "2010_001574.jpg").unlink()
    with pytest.raises(DitfError, match=r"missing image .*2010_001574\.jpg \(needed by .*test_pairs_pf_pascal\.csv:2\)"):
        get_dataset("pfpascal", root).pairs()
    _image(root / "Other" / "2009_002391.jpg", (10, 10))
    _image(root / "JPEGImages" / "2010_001574.jpg", (10, 10))
    row = ROW1.replace("PF-dataset-PASCAL/JPEGImages/2010_001574.jpg", "PF-dataset-PASCAL/Other/2009_002391.jpg")
    (root / "test_pairs_pf_pascal.csv").write_text(f"{HEADER}\n{row}\n")
    with pytest.raises(DitfError, match="share the key 'aeroplane/2009_002391'"):
        get_dataset("pfpascal", root).pairs()
