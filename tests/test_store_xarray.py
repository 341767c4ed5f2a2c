"""The whole store opens as one xarray DataTree: every array has named dimensions."""

from __future__ import annotations

import warnings

import pytest

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.core.settings import MatchSettings as StageSettings
from ditf_pipeline.pipeline.stages import match
from ditf_pipeline.store.feature_store import FeatureStore

xr = pytest.importorskip("xarray")


def test_open_datatree_reads_features_index_prompts_and_predictions(tmp_path):
    from ditf_pipeline.models import load_adapter

    root = make_spair_demo(tmp_path / "SPair", categories=("cat",), pairs_per_category=1)
    path = tmp_path / "s.zarr"
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    with FeatureStore(path) as store:  # closed: the consolidated metadata is written
        Extractor(load_adapter("tiny-flux", device="cpu"), store, settings).run(
            get_dataset("spair", root, "test"), progress=False)
        match(store, get_dataset("spair", root, "test"), "tiny-flux", 1, 260,
              StageSettings(variant="adaln+cd", channels="none"), progress=False)
    # opened from the consolidated metadata alone (consolidated=True fails without it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zarr: ".ditf is not a zarr node", "not in the v3 spec yet"
        tree = xr.open_datatree(str(path), engine="zarr", zarr_format=3, consolidated=True)
    key = tree["spair/tiny-flux/k1/t260"]
    assert key["pre_adaln"].dims == ("image", "row", "col", "channel")
    assert int(key["complete"].sum()) == tree["spair/images"].sizes["image"]
    assert any("prompt_embeds" in node.ds for node in tree["prompts"].subtree)
    assert any("pred" in node.ds for node in key.subtree)
