"""`read_image` reads the small per-image arrays (commit flag, grid, AdaLN vectors) a shard at a
time (`store/file_rows.py`), and still sees what a per-row read sees: rows committed later,
rewritten rows."""

import numpy as np
import zarr

from ditf_pipeline.store.feature_store import FeatureStore

N_IMAGES = 40  # two shards of 32 rows


def _image(i: int, names) -> tuple[np.ndarray, dict]:
    rows, cols = 1 + i % 3, 1 + i % 2
    z = np.full((rows, cols, 4), i, np.float16)
    return z, {n: np.full(4, i + 0.5, np.float32) for n in names}

def _arrays(tmp_path, written=N_IMAGES):
    arrays = FeatureStore(tmp_path / "s.zarr").open_features("spair", "m", 1, 2, config={"x": 1}, n_images=N_IMAGES,
                                                              grid_max=(3, 3), hidden_size=4)
    for i in range(written):
        arrays.write_image(i, *_image(i, arrays.modulation_names))
    return arrays

def test_each_shard_of_the_small_arrays_is_read_once(tmp_path, monkeypatch):
    arrays = _arrays(tmp_path)
    reader = FeatureStore(tmp_path / "s.zarr").open_features("spair", "m", 1, 2)
    reads: list[str] = []
    getitem = zarr.Array.__getitem__

    def counted(self, selection):
        reads.append(self.basename)
        return getitem(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", counted)
    for i in range(N_IMAGES):
        z, modulation = reader.read_image(i, vectors=("shift", "scale"))
        expected_z, expected_modulation = _image(i, arrays.modulation_names)
        assert np.array_equal(z, expected_z)
        assert {n: v.tolist() for n, v in modulation.items()} == {n: expected_modulation[n].tolist() for n in ("shift", "scale")}
    # one read per shard of each small array (a per-row read would make 40 of each)
    assert {name: reads.count(name) for name in ("complete", "grid", "shift", "scale")} == dict.fromkeys(
        ("complete", "grid", "shift", "scale"), 2)
    assert reads.count("pre_adaln") == N_IMAGES

def test_an_image_committed_after_its_shard_was_read_is_read_whole(tmp_path):
    writer = _arrays(tmp_path, written=1)
    reader = FeatureStore(tmp_path / "s.zarr").open_features("spair", "m", 1, 2)
    reader.read_image(0)  # caches shard 0: image 1 uncommitted, its grid and vectors fill values
    writer.write_image(1, *_image(1, writer.modulation_names))
    z, modulation = reader.read_image(1)
    assert np.array_equal(z, _image(1, ())[0]) and modulation["shift"].tolist() == [1.5] * 4

def test_a_row_rewritten_by_the_same_arrays_is_read_anew(tmp_path):
    arrays = _arrays(tmp_path, written=2)
    arrays.read_image(1)
    arrays.write_image(1, np.ones((3, 3, 4), np.float16), {n: np.full(4, 7, np.float32) for n in arrays.modulation_names})
    z, modulation = arrays.read_image(1)
    assert z.shape == (3, 3, 4) and modulation["scale"].tolist() == [7.0] * 4
