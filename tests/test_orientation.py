"""Pixels are read in the frame their annotations use: stored orientation for the annotated
benchmarks (an EXIF orientation tag is ignored, as the authors' plain PIL loading does), the
displayed one for a folder of photos. Each key's config records which.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.core.images import image_size, load_for_model, load_rgb
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.store.feature_store import FeatureStore

ROTATE_90 = 6  # EXIF orientation "rotate 90 CW to display": width and height swap


def _tag_orientation(path: Path, orientation: int = ROTATE_90) -> None:
    """Insert an EXIF APP1 segment right after the JPEG's SOI marker: the compressed pixels are
    untouched, so the file decodes to the same array with or without the tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()  # b"Exif\0\0" + TIFF
    data = path.read_bytes()
    assert data[:2] == b"\xff\xd8"
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:])


def _extract(root: Path, store: Path, dataset: str = "spair") -> FeatureStore:
    result = CliRunner().invoke(app, ["extract", "--model", "tiny-flux", "--dataset", dataset, "--data-root", str(root),
                                      "--store", str(store), "--img-size", "64", "--ensemble-size", "1",
                                      "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    return FeatureStore(store, read_only=True)


def _features(store: FeatureStore, dataset: str, key: str) -> np.ndarray:
    (_, _, k, t), = [entry for entry in store.feature_keys(dataset)]
    arrays = store.open_features(dataset, "tiny-flux", k, t)
    return arrays.read_image(store.image_rows(dataset)[key])[0]


def _config(store: FeatureStore, dataset: str) -> dict:
    (_, _, k, t), = [entry for entry in store.feature_keys(dataset)]
    return store.open_features(dataset, "tiny-flux", k, t).config


def test_the_readers_can_ignore_the_tag(tmp_path):
    path = tmp_path / "r.jpg"
    Image.new("RGB", (40, 20), (0, 0, 255)).save(path, quality=95)
    plain = np.asarray(load_rgb(path))
    _tag_orientation(path)
    assert image_size(path) == (20, 40) and load_rgb(path).size == (20, 40)  # displayed frame
    assert image_size(path, exif_transpose=False) == (40, 20)
    for resample in ("pil-bicubic", "cv2-bilinear"):  # cv2.imread rotates by itself unless told not to
        assert load_for_model(path, resample).size == (20, 40)
        assert load_for_model(path, resample, exif_transpose=False).size == (40, 20)
    np.testing.assert_array_equal(np.asarray(load_rgb(path, exif_transpose=False)), plain)


def test_which_datasets_apply_the_tag():
    """Every annotated benchmark reads stored pixels; only photos (the folder reader, and any
    image list the API builds, which takes the base class's default) apply the tag."""
    from ditf_pipeline.datasets import _REGISTRY, dataset_names
    from ditf_pipeline.datasets.base import Dataset

    assert Dataset.exif_transpose is True
    applied = {name for name in dataset_names() if _REGISTRY[name].exif_transpose}
    assert applied == {"folder"}, applied


@pytest.fixture(scope="module")
def spair_roots(tmp_path_factory):
    """The same SPair-layout data twice; in the second, one image carries an axis-swapping tag."""
    base = tmp_path_factory.mktemp("orientation")
    plain = make_spair_demo(base / "plain", categories=("cat",), pairs_per_category=1)
    tagged = make_spair_demo(base / "tagged", categories=("cat",), pairs_per_category=1)
    image = sorted((tagged / "JPEGImages" / "cat").glob("*.jpg"))[0]
    width, height = Image.open(image).size
    assert width != height  # so the tag would swap the sides the annotation states
    _tag_orientation(image)
    return base, plain, tagged, f"cat/{image.stem}"


def test_an_annotated_benchmark_reads_the_stored_pixels(spair_roots):
    base, plain, tagged, key = spair_roots
    reference = _extract(plain, base / "plain.zarr")
    store = _extract(tagged, base / "tagged.zarr")  # refused before: "is HxW but ... says WxH"
    assert _config(store, "spair")["orientation"] == "stored"
    np.testing.assert_array_equal(_features(store, "spair", key), _features(reference, "spair", key))


def test_a_folder_of_photos_reads_the_displayed_pixels(tmp_path):
    """A tagged photo gives the features of the upright image a viewer shows (same key, so the
    same noise: one folder holds the tagged file, the other that upright image untagged)."""
    tagged, upright = tmp_path / "tagged", tmp_path / "upright"
    tagged.mkdir(), upright.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tagged / "photo.jpg", quality=100, subsampling=0)
    _tag_orientation(tagged / "photo.jpg")
    displayed = np.asarray(load_rgb(tagged / "photo.jpg"))
    assert displayed.shape == (80, 48, 3)
    Image.fromarray(displayed).save(upright / "photo.png")
    store = _extract(tagged, tmp_path / "tagged.zarr", dataset="folder")
    reference = _extract(upright, tmp_path / "upright.zarr", dataset="folder")
    assert _config(store, "folder")["orientation"] == "exif applied"
    np.testing.assert_array_equal(_features(store, "folder", "photo"), _features(reference, "folder", "photo"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # zarr's notes on consolidating a ditf store by hand
def test_a_key_that_does_not_record_the_orientation_resumes_as_it_is(spair_roots, tmp_path):
    """Such a key read every image with the tag applied: the same pixels for every untagged file,
    so it is resumed (not refused as "written with another configuration") and keeps its config."""
    import zarr

    base, plain, _, _ = spair_roots
    store = tmp_path / "s.zarr"
    _extract(plain, store)
    (_, _, k, t), = FeatureStore(store, read_only=True).feature_keys("spair")
    group = zarr.open_group(str(store), mode="a")[f"spair/tiny-flux/k{k}/t{t}"]
    group.attrs["config"] = {name: value for name, value in group.attrs["config"].items() if name != "orientation"}
    zarr.consolidate_metadata(str(store))  # readers see the consolidated copy
    assert "orientation" not in _config(FeatureStore(store, read_only=True), "spair")
    result = CliRunner().invoke(app, ["extract", "--model", "tiny-flux", "--data-root", str(plain), "--store", str(store),
                                      "--img-size", "64", "--ensemble-size", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    assert "orientation" not in _config(FeatureStore(store, read_only=True), "spair")
