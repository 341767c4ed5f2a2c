"""Stores of schema 1 (ditf before checksums, transactions and split-keyed predictions) keep working.

`_to_schema_1` rewrites a fresh store into schema 1's layout, array by array, the way the old
code wrote it: no checksum codec, no image-index commit mark, predictions at
`predictions/<variant>/<protocol>`, the prompt cache as row-appended arrays without dimension
names, and schema_version 1 in the root and in each key's config.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from _store_snapshot import snapshot, without_store
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline import SCHEMA_VERSION
from ditf_pipeline.store.doctor import Findings, check_store
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.core.settings import MatchSettings as StageSettings
from ditf_pipeline.pipeline.stages import match, score
from ditf_pipeline.store.feature_store import FeatureStore

KEY = "spair/tiny-flux/k1/t260"
SETTINGS = StageSettings(variant="adaln+cd", channels="none")
BLOSC = zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def _copy_array(source: zarr.Array, group: zarr.Group, name: str, compressed: bool, dims: bool = True) -> None:
    values = source[...]
    text = source.dtype.kind == "O"  # variable-length strings as numpy object (zarr 3.1.3 with numpy 1.x)
    if text:
        values = np.asarray(values).astype(str)
    array = group.create_array(name, shape=source.shape, chunks=source.chunks, dtype=str if text else source.dtype,
                               fill_value=source.metadata.fill_value, compressors=BLOSC if compressed else None,
                               dimension_names=source.metadata.dimension_names if dims else None, overwrite=True)
    array[...] = values


def _to_schema_1(path) -> None:
    root = zarr.open_group(str(path), mode="a")
    root.attrs["ditf_schema_version"] = 1
    images = root["spair/images"]
    del images.attrs["count"]
    for name in ("key", "size"):
        _copy_array(images[name], images, name, compressed=False)
    key = root[KEY]
    config = dict(key.attrs["config"])
    key.attrs["config"] = {**config, "schema_version": 1}
    for name, array in list(key.arrays()):
        _copy_array(array, key, name, compressed=name == "pre_adaln")
    (scope,) = [name for name, _ in key["predictions"].groups()]
    for variant, variant_group in list(key[f"predictions/{scope}"].groups()):
        for protocol, group in list(variant_group.groups()):
            old = key.require_group(f"predictions/{variant}/{protocol}")
            old.attrs.update(dict(group.attrs))
            for name, array in group.arrays():
                _copy_array(array, old, name, compressed=name == "pred")
    del key[f"predictions/{scope}"]
    for cache_name, cache in list(root["prompts"].groups()):
        entries = list(cache.groups())
        names = sorted(entries[0][1].attrs["names"])
        cache.create_array("text", shape=(len(entries),), chunks=(4096,), dtype=str, fill_value="")
        cache["text"][:] = np.array([g.attrs["text"] for _, g in entries], dtype=object).astype(str)
        cache.create_array("complete", shape=(len(entries),), chunks=(1,), dtype=bool, fill_value=False)
        cache["complete"][:] = True
        for name in names:
            value = entries[0][1][name]
            stacked = cache.create_array(name, shape=(len(entries), *value.shape), chunks=(1, *value.shape),
                                         dtype="float32", fill_value=0, compressors=BLOSC)
            stacked[...] = np.stack([g[name][...] for _, g in entries])
        cache.attrs["names"] = names
        for entry, _ in entries:
            del cache[entry]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from ditf_pipeline.models import load_adapter

    tmp = tmp_path_factory.mktemp("v1")
    root = make_spair_demo(tmp / "SPair", categories=("cat",), pairs_per_category=3)
    adapter = load_adapter("tiny-flux", device="cpu", dtype="fp32")
    new = tmp / "new.zarr"
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    Extractor(adapter, FeatureStore(new), settings).run(get_dataset("spair", root, "test"), progress=False)
    match(FeatureStore(new), get_dataset("spair", root, "test"), "tiny-flux", 1, 260, SETTINGS, progress=False)
    old = tmp / "old.zarr"
    shutil.copytree(new, old)
    _to_schema_1(old)
    return adapter, root, new, old


def _score(root, path):
    result = without_store(score(FeatureStore(path, read_only=True), get_dataset("spair", root, "test"), "tiny-flux", 1,
                                 260, SETTINGS))
    # the numbers must agree; the key's recorded settings legitimately differ (a schema-1 key was
    # written before the resize/VAE/architecture fields existed)
    result.pop("features", None)
    return result


def test_a_schema_1_store_is_read_scored_and_checked_as_it_is(stores):
    _, root, new, old = stores
    assert zarr.open_group(str(old), mode="r").attrs["ditf_schema_version"] == 1
    assert _score(root, old) == _score(root, new)
    findings = Findings()
    check_store(old, findings)
    assert not findings.problems, findings.problems


def test_a_schema_1_store_resumes_and_is_upgraded_in_place(stores, tmp_path):
    adapter, root, new, old = stores
    store = tmp_path / "old.zarr"
    shutil.copytree(old, store)
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    report = Extractor(adapter, FeatureStore(store), settings).run(get_dataset("spair", root, "test"), progress=False)
    assert report.skipped == report.n_images  # the schema-1 key is resumed, not refused or redone
    assert zarr.open_group(str(store), mode="r").attrs["ditf_schema_version"] == SCHEMA_VERSION
    other = StageSettings(variant="raw", channels="none")
    match(FeatureStore(store), get_dataset("spair", root, "test"), "tiny-flux", 1, 260, other, progress=False)
    assert score(FeatureStore(store, read_only=True), get_dataset("spair", root, "test"), "tiny-flux", 1, 260, other)
    assert _score(root, store) == _score(root, new)  # the schema-1 predictions are still found
    for name, value in snapshot(new).items():
        if name.startswith(f"/{KEY}/") and "predictions" not in name and not name.endswith("@"):
            assert np.array_equal(snapshot(store)[name][4], value[4]), name


def test_doctor_migrate_converts_a_schema_1_store(stores, tmp_path):
    _, root, new, old = stores
    store = tmp_path / "old.zarr"
    shutil.copytree(old, store)
    findings = Findings()
    check_store(store, findings, migrate=True)
    assert not findings.problems and any("migrated" in line for line in findings.repaired)
    assert zarr.open_group(str(store), mode="r")["spair/images"].attrs["count"] == len(FeatureStore(new).image_rows("spair"))
    assert _score(root, store) == _score(root, new)


def test_a_key_recorded_without_the_transformer_class_resumes_with_it():
    """Keys written before the architecture recorded its class compare on blocks and width alone."""
    from ditf_pipeline.store.schema import config_differences

    old = {"architecture": {"width": 64, "blocks": [["double", 2], ["single", 4]]}, "t": 260}
    new = {"architecture": {**old["architecture"], "class": "FluxTransformer2DModel"}, "t": 260}
    assert config_differences(old, new) == []
    other = {"architecture": {**old["architecture"], "class": "ChromaTransformer2DModel"}, "t": 260}
    assert config_differences(new, other) != []  # a recorded class is compared
    assert config_differences(old, {**new, "t": 90}) != []
