"""An image's store row is what it was computed from: its size and a digest of its decoded pixels.

A name reused for other pixels (`--dataset folder`, `cat.png` replaced) is refused instead of
being "already complete" with the old image's features; the same pixels under the same name
are reused; an index written before the digest column still opens and grows.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import load_rgb, pixel_digest
from ditf_pipeline.store.feature_store import FeatureStore

CLI = ["extract", "--model", "tiny-flux", "--dataset", "folder", "--img-size", "32", "--ensemble-size", "1",
       "--dtype", "fp32", "--no-progress"]


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _extract(root, store):
    return CliRunner().invoke(app, [*CLI, "--data-root", str(root), "--store", str(store)])


@pytest.mark.parametrize("replacement", [((80, 48), 1), ((64, 64), 2)], ids=["other-size", "same-size-other-pixels"])
def test_a_name_reused_for_other_pixels_is_refused(tmp_path, replacement):
    root, store = tmp_path / "photos", tmp_path / "s.zarr"
    root.mkdir()
    _noise((64, 64), 0).save(root / "cat.png")
    first = _extract(root, store)
    assert first.exit_code == 0, first.output
    before = FeatureStore(store, read_only=True).image_identities("folder")
    assert before["cat"] == ((64, 64), pixel_digest(load_rgb(root / "cat.png")))

    size, seed = replacement
    _noise(size, seed).save(root / "cat.png")
    again = _extract(root, store)
    assert again.exit_code == 1, again.output
    assert "error: image 'cat' of folder" in again.output and "another image" in again.output
    assert "Traceback" not in again.output
    assert FeatureStore(store, read_only=True).image_identities("folder") == before  # nothing written


def test_the_same_pixels_in_another_file_format_are_the_same_image(tmp_path):
    root, store = tmp_path / "photos", tmp_path / "s.zarr"
    root.mkdir()
    _noise((64, 64), 0).save(root / "cat.png")
    assert _extract(root, store).exit_code == 0
    (root / "cat.png").rename(root / "cat.bmp")  # lossless: the same decoded pixels
    result = _extract(root, store)
    assert result.exit_code == 0, result.output
    assert "0 image(s) extracted, 1 already complete" in result.output


def test_an_index_without_digests_still_opens_and_grows(tmp_path):
    """Rows written before the digest column: their size is still compared, the column is added on growth."""
    path = tmp_path / "s.zarr"
    store = FeatureStore(path)
    store.register_images("folder", ["a"], [(4, 3)], ["d-a"])
    index = store.group("folder/images")
    del index["digest"]
    reopened = FeatureStore(path)
    assert reopened.image_identities("folder") == {"a": ((4, 3), "")}
    with pytest.raises(DitfError, match="another image"):
        reopened.register_images("folder", ["a"], [(5, 3)], ["d-a"])
    rows = reopened.register_images("folder", ["a", "b"], [(4, 3), (2, 2)], ["anything", "d-b"])
    assert rows == {"a": 0, "b": 1}
    assert FeatureStore(path, read_only=True).image_identities("folder") == {"a": ((4, 3), ""), "b": ((2, 2), "d-b")}
