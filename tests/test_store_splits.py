"""All splits of a benchmark in one store: the AP-10K loop of docs/reproducing.md works as written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.demo.ap10k import make_ap10k_demo
from ditf_pipeline.store.feature_store import FeatureStore

SPLITS = ("intra-species", "cross-species", "cross-family")


@pytest.mark.slow
def test_ap10k_loop_puts_three_splits_in_one_store_and_each_scores(tmp_path):
    root = make_ap10k_demo(tmp_path / "ap-10k")
    store = tmp_path / "s.zarr"
    cli = CliRunner()
    common = ["--model", "tiny-flux", "--dataset", "ap10k", "--data-root", str(root), "--store", str(store)]
    runs = {}
    for split in SPLITS:  # for split in ...; do ditf run ... --split $split; done
        out = tmp_path / f"{split}.json"
        result = cli.invoke(app, ["run", *common, "--split", split, "--img-size", "64", "--ensemble-size", "1",
                                  "--no-progress", "--format", "json", "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs[split] = json.loads(out.read_text())
    keys = FeatureStore(store, read_only=True).feature_keys()
    assert len(keys) == 1  # one feature key holds the images of every split
    groups = [name for name, _ in FeatureStore(store, read_only=True).prediction_groups(*keys[0])]
    assert {name.split("/")[0].rsplit("-", 1)[0] for name in groups} == set(SPLITS), groups
    for split in SPLITS:  # each split's predictions are found again by its own score
        out = tmp_path / f"score-{split}.json"
        result = cli.invoke(app, ["score", *common, "--split", split, "--format", "json", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text()) == runs[split]
    again = cli.invoke(app, ["run", *common, "--split", "cross-species", "--img-size", "64", "--ensemble-size", "1",
                             "--no-progress", "--overwrite", "--format", "json", "--out", str(tmp_path / "again.json")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again.json").read_text()) == runs["cross-species"]
