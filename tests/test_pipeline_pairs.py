"""match -> score from the store, on generated SPair-layout data.

Features are written into a real store with known content (the images' own colours sampled on
a fine grid), so the expected accuracy is known without any DiT; one test runs the real tiny
DiT through the CLI end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.score.evaluate import score_pairs
from ditf_pipeline.core.images import image_size, load_rgb
from ditf_pipeline.match.matchers import DiftMatcher
from ditf_pipeline.match.predict import MatchSettings, predict
from ditf_pipeline.score.pck import pck
from ditf_pipeline.store.feature_store import FeatureStore

STRIDE = 4
DIM = 16


def colour_features(path: Path, massive: dict[int, float] | None = None) -> np.ndarray:
    """(rows, cols, DIM): fixed random mixes of the image's mean colour per STRIDE cell."""
    img = np.asarray(load_rgb(path), dtype=np.float32) / 255.0
    rows, cols = img.shape[0] // STRIDE, img.shape[1] // STRIDE
    cells = img[: rows * STRIDE, : cols * STRIDE].reshape(rows, STRIDE, cols, STRIDE, 3).mean(axis=(1, 3))
    mixing = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
    feature = (cells - 0.5) @ mixing
    # massive activations: huge on every token, with a little spatial variance that (being
    # ~100x the informative channels) decides every cosine
    rng = np.random.default_rng(len(path.name) + rows * cols)
    for channel, value in (massive or {}).items():
        feature[..., channel] = value * (1 + 0.05 * rng.standard_normal((rows, cols)))
    return feature


def write_store(store_path: Path, root: Path, massive: dict[int, float] | None = None) -> FeatureStore:
    dataset = get_dataset("spair", root, "test")
    records = dataset.images()
    store = FeatureStore(store_path)
    rows = store.register_images("spair", [r.key for r in records], [image_size(r.path) for r in records])
    arrays = store.open_features(
        "spair", "colour", 0, 0, config={"model": "colour"}, n_images=len(rows), grid_max=(64, 64), hidden_size=DIM,
        modulation_names=["shift_t", "scale_t", "gate_t", "shift_c", "scale_c", "gate_c"],
    )
    zeros = np.zeros(DIM, dtype=np.float32)
    for record in records:
        vectors = {name: zeros for name in arrays.modulation_names}
        arrays.write_image(rows[record.key], colour_features(record.path, massive).astype(np.float16), vectors)
    return store


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("pairs")
    root = make_spair_demo(base / "SPair", pairs_per_category=4)
    return root, base


def test_predictions_in_store_equal_direct_matching_and_score_is_high(demo, tmp_path):
    root, _ = demo
    store = write_store(tmp_path / "s.zarr", root)
    dataset = get_dataset("spair", root, "test")
    report = predict(store, dataset, "colour", 0, 0, MatchSettings(variant="raw"), progress=False)
    assert report.matched == len(dataset.pairs()) and report.skipped == 0
    stored = store.open_predictions(("spair", "colour", 0, 0), "raw/dift").read()
    matcher = DiftMatcher()
    paths = {record.key: record.path for record in dataset.images()}
    direct = []
    for pair in dataset.pairs():
        src, trg = (colour_features(paths[key]).astype(np.float16).astype(np.float32) for key in (pair.src_key, pair.trg_key))
        direct.append(matcher.match(src, pair.src_size, trg, pair.trg_size, pair.src_kps))
        assert np.array_equal(stored[pair.pair_id], direct[-1].astype(np.float32)), pair.pair_id
    result = score_pairs(store, dataset, "colour", 0, 0, "raw/dift")
    expected = pck(direct, dataset.pairs(), dataset.alphas, protocol="dift", dataset="spair", model="colour", k=0, t=0,
                   variant="raw")
    assert result["pck"] == expected["pck"]
    # colour features find the distinctively coloured keypoint discs (left/right twins stay ambiguous)
    assert result["pck"]["0.1"]["per_point"]["all"] > 40  # random features: ~5
    assert result["n_pairs"] == len(dataset.pairs())


def test_rerun_is_incremental_and_other_settings_are_refused(demo, tmp_path):
    root, _ = demo
    store = write_store(tmp_path / "s.zarr", root)
    dataset = get_dataset("spair", root, "test")
    predict(store, dataset, "colour", 0, 0, MatchSettings(variant="adaln+cd", channels="1,2"), progress=False)
    again = predict(store, dataset, "colour", 0, 0, MatchSettings(variant="adaln+cd", channels="1,2"), progress=False)
    assert again.matched == 0 and again.skipped == len(dataset.pairs())
    with pytest.raises(DitfError, match="channels"):
        predict(store, dataset, "colour", 0, 0, MatchSettings(variant="adaln+cd", channels="3"), progress=False)
    redone = predict(store, dataset, "colour", 0, 0, MatchSettings(variant="adaln+cd", channels="3"), overwrite=True,
                     progress=False)
    assert redone.matched == len(dataset.pairs()) and redone.channels == [3]


def test_massive_channels_destroy_raw_matching_and_auto_discard_recovers_it(demo, tmp_path):
    root, _ = demo
    dataset = get_dataset("spair", root, "test")
    clean = write_store(tmp_path / "clean.zarr", root)
    predict(clean, dataset, "colour", 0, 0, MatchSettings(variant="raw"), progress=False)
    clean_pck = score_pairs(clean, dataset, "colour", 0, 0, "raw/dift")["pck"]["0.1"]["per_point"]["all"]
    store = write_store(tmp_path / "massive.zarr", root, massive={7: 300.0, 11: -200.0})
    for variant in ("raw", "adaln+cd"):
        predict(store, dataset, "colour", 0, 0, MatchSettings(variant=variant, channels="auto"), progress=False)
    raw = score_pairs(store, dataset, "colour", 0, 0, "raw/dift")
    cd = score_pairs(store, dataset, "colour", 0, 0, "adaln+cd/dift")
    assert cd["channels"] == [7, 11]
    assert raw["pck"]["0.1"]["per_point"]["all"] < clean_pck - 20
    assert cd["pck"]["0.1"]["per_point"]["all"] > clean_pck - 15


def test_score_refuses_missing_predictions_and_features(demo, tmp_path):
    root, _ = demo
    store = write_store(tmp_path / "s.zarr", root)
    dataset = get_dataset("spair", root, "test")
    with pytest.raises(DitfError, match="run `ditf match` first"):
        score_pairs(store, dataset, "colour", 0, 0, "raw/dift")
    with pytest.raises(DitfError, match="no features"):
        predict(store, dataset, "colour", 5, 0, MatchSettings(variant="raw"), progress=False)
    with pytest.raises(DitfError, match="unknown variant"):
        predict(store, dataset, "colour", 0, 0, MatchSettings(variant="nope"), progress=False)
    with pytest.raises(DitfError, match="unknown matching protocol"):
        predict(store, dataset, "colour", 0, 0, MatchSettings(variant="raw", protocol="nope"), progress=False)


def test_pair_images_missing_from_the_store_are_named(demo, tmp_path):
    root, base = demo
    store = write_store(tmp_path / "s.zarr", root)
    bigger = make_spair_demo(base / "bigger", categories=("cat", "car", "dog"), pairs_per_category=4)
    with pytest.raises(DitfError, match="have no features.*dog/"):
        predict(store, get_dataset("spair", bigger, "test"), "colour", 0, 0, MatchSettings(variant="raw"), progress=False)


def test_keypoint_outside_the_image_is_one_clear_error(tmp_path):
    root = make_spair_demo(tmp_path / "SPair", pairs_per_category=2)
    pair_file = sorted((root / "PairAnnotation" / "test").glob("*.json"))[0]
    pair = json.loads(pair_file.read_text())
    pair["src_kps"][0] = [pair["src_imsize"][0] + 50, 3]
    pair_file.write_text(json.dumps(pair))
    with pytest.raises(DitfError, match=f"{pair_file.stem}.json: source keypoint 0 .* lies outside the"):
        get_dataset("spair", root, "test").pairs()  # the reader refuses it, before any stage runs


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ditf_cli.main", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_cli_run_then_score_without_torch(tmp_path):
    root = make_spair_demo(tmp_path / "SPair", pairs_per_category=2)
    store = tmp_path / "s.zarr"
    common = ["--model", "tiny-flux", "--data-root", str(root), "--store", str(store)]
    result = _cli("run", *common, "--img-size", "96", "--ensemble-size", "2", "--no-progress", "--format", "json",
                  "--out", str(tmp_path / "run.json"))
    assert result.returncode == 0, result.stderr
    [from_run] = json.loads((tmp_path / "run.json").read_text())
    assert from_run["variant"] == "adaln+cd" and from_run["protocol"] == "dift" and set(from_run["pck"]) == {"0.01", "0.05", "0.1"}
    # score in a process that must never import torch or the adapters
    code = (
        "import sys, json; from ditf_cli.main import app; "
        "sys.argv=['ditf','score',*json.loads(sys.argv[1])]; "
        "import typer.main as tm; cmd=tm.get_command(app)\n"
        "try:\n    cmd.main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    bad=[m for m in sys.modules if m=='torch' or m.startswith('ditf_pipeline.models') or m=='diffusers']\n"
        "    print('IMPORTED', bad)"
    )
    args = json.dumps([*common, "--format", "json", "--out", str(tmp_path / "score.json")])
    scored = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert scored.returncode == 0, scored.stderr
    assert "IMPORTED []" in scored.stdout
    assert [r["pck"] for r in json.loads((tmp_path / "score.json").read_text())] == [from_run["pck"]]
    table = _cli("score", *common, "--format", "markdown")
    assert table.returncode == 0 and "| per point | 0.1 |" in table.stdout.replace("  ", " ")
    ablation = _cli("ablate", *common, "--no-progress")
    assert ablation.returncode == 0, ablation.stderr
    for variant in ("raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c"):
        assert f"\n{variant} " in ablation.stdout


def test_cli_errors_are_one_line(tmp_path):
    root = make_spair_demo(tmp_path / "SPair", pairs_per_category=2)
    result = _cli("score", "--model", "tiny-flux", "--data-root", str(root), "--store", str(tmp_path / "none.zarr"))
    assert result.returncode == 1 and result.stderr.startswith("error: store") and "Traceback" not in result.stderr
    assert not (tmp_path / "none.zarr").exists()
