"""`ditf analyze` / `ditf show` on a synthetic store with injected massive channels.

The features are built from the demo images' known geometry: channel j (j < 8) carries a bump at
keypoint j, three channels carry the image colour, and a few "massive" channels carry ~3000 on
every token with 15% token-to-token jitter (as in a real DiT stream: big, nearly constant,
uninformative). Cosine matching on the raw stream then sees only the jitter of the massive
channels; discarding them (`adaln+cd`, `--channels auto`) recovers the keypoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.analysis import analyze as an
from ditf_pipeline.analysis import plots as pl
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.score.evaluate import score_pairs
from ditf_pipeline.match.predict import MatchSettings, predict, resolve_channels
from ditf_pipeline.store.feature_store import FeatureStore

D = 64
STRIDE = 8
MODEL = "synthetic"
#: (k, t) -> injected massive channels; at (2, 260) the gate of channel 44 is only the 5th largest
MASSIVE = {(1, 90): [13, 37, 50], (1, 260): [13, 37, 50], (2, 260): [21, 44]}
GATE_RANK_OF_44 = 5


def _image_features(image: np.ndarray, kps: dict, massive: list[int], rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    rows, cols = -(-height // STRIDE), -(-width // STRIDE)
    z = rng.normal(0.0, 0.2, size=(rows, cols, D))
    rr, cc = np.mgrid[0:rows, 0:cols]
    for j, point in kps.items():
        if point is None:
            continue
        # token centres of a bilinear (align_corners=False) upsampling to the image size
        u = (point[0] + 0.5) * cols / width - 0.5
        v = (point[1] + 0.5) * rows / height - 0.5
        z[..., int(j)] += 5.0 * np.exp(-((rr - v) ** 2 + (cc - u) ** 2) / (2 * 0.8**2))
    small = np.asarray(Image.fromarray(image).resize((cols, rows), Image.BILINEAR), dtype=np.float64) / 255.0
    z[..., 8:11] += 0.5 * small
    for c in massive:
        z[..., c] = 3000.0 * (1.0 + 0.15 * rng.standard_normal((rows, cols)))
    return z.astype(np.float16)


def _modulation(massive: list[int], key: tuple[int, int], rng: np.random.Generator) -> dict:
    gate = rng.uniform(-0.1, 0.1, size=D)
    for i, c in enumerate(massive):
        gate[c] = (-1) ** i * (2.0 - 0.1 * i)  # the largest |gate| entries, of both signs
    if key == (2, 260):
        gate[[1, 2, 3, 4]] = [3.0, -2.9, 2.8, 2.7]  # four bigger gates: channel 44 ranks 5th, 21 ranks 6th
        gate[21], gate[44] = -1.5, 2.0
    return {
        "shift": rng.normal(0, 0.05, size=D), "scale": rng.normal(0, 0.05, size=D), "gate": gate,
    }


def write_synthetic_store(root: Path, store_path: Path) -> FeatureStore:
    dataset = get_dataset("spair", root, "test")
    records = dataset.images()
    images = {r.key: np.asarray(Image.open(r.path).convert("RGB")) for r in records}
    annotations = {
        r.key: json.loads((root / "ImageAnnotation" / r.key).with_suffix(".json").read_text())["kps"] for r in records
    }
    store = FeatureStore(store_path)
    rows = store.register_images("spair", [r.key for r in records], [images[r.key].shape[1::-1] for r in records])
    grid_max = (max(-(-im.shape[0] // STRIDE) for im in images.values()), max(-(-im.shape[1] // STRIDE) for im in images.values()))
    for (k, t), massive in MASSIVE.items():
        arrays = store.open_features("spair", MODEL, k, t, config={"synthetic": True}, n_images=len(records),
                                     grid_max=grid_max, hidden_size=D)
        for i, r in enumerate(records):
            rng = np.random.default_rng([k, t, i])
            arrays.write_image(rows[r.key], _image_features(images[r.key], annotations[r.key], massive, rng),
                               _modulation(massive, (k, t), np.random.default_rng([k, t])))
    return store


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("analyze")
    root = make_spair_demo(base / "SPair", pairs_per_category=3)
    write_synthetic_store(root, base / "s.zarr")
    return root, base / "s.zarr"


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def _common(root, store):
    return ["--model", MODEL, "--dataset", "spair", "--data-root", root, "--store", store]


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1], f"{path} is a blank image"
        return image.size


def test_detects_exactly_the_injected_channels(demo):
    root, store_path = demo
    store = FeatureStore(store_path, read_only=True)
    for (k, t), massive in MASSIVE.items():
        result = an.analyze_key(store.open_features("spair", MODEL, k, t), sample=0, key=("spair", MODEL, k, t))
        summary = result.summary
        assert summary["massive_channels"] == sorted(massive)
        assert summary["n_images"] == 6
        raw = summary["stages"]["raw"]
        assert {e["channel"] for e in raw["ranks"][: len(massive)]} == set(massive)
        assert raw["ranks"][0]["mean"] == pytest.approx(3000, rel=0.05)
        assert raw["ranks"][0]["std"] == pytest.approx(450, rel=0.2)
        assert raw["top_over_median"] > 100
        # after channel discard nothing is massive any more, and the injected channels are exactly 0
        assert summary["stages"]["adaln+cd"]["massive"] == []
        assert all(result.channel_mean["adaln+cd"][c] < 1.0 for c in massive)
        assert [e["rank"] for e in raw["ranks"]] == [1, 2, 3, 10, 20]
    # the gate: at (1, 260) the massive channels are the top-3 |gate| entries, at (2, 260) not
    gate = an.analyze_key(store.open_features("spair", MODEL, 1, 260)).summary["gate"]
    assert gate["coincide"] and gate["overlap"] == 1.0
    assert sorted(m["abs_gate_rank"] for m in gate["massive"]) == [1, 2, 3]
    gate = an.analyze_key(store.open_features("spair", MODEL, 2, 260)).summary["gate"]
    assert {m["channel"]: m["abs_gate_rank"] for m in gate["massive"]} == {21: 6, 44: GATE_RANK_OF_44}
    assert gate["overlap"] == 0.0 and not gate["coincide"]


def test_gate_coincidence_on_a_constructed_case():
    gate = np.array([0.1, -5.0, 0.3, 2.0, -0.2, 4.0, 0.0, 1.0])
    # |gate| order: 1 (5.0), 5 (4.0), 3 (2.0), 7 (1.0), 2 (0.3), 4 (0.2), 0 (0.1), 6
    out = an.gate_coincidence([1, 3], gate, top=4)
    assert [(m["channel"], m["abs_gate_rank"]) for m in out["massive"]] == [(1, 1), (3, 3)]
    assert out["overlap"] == 0.5 and out["overlap_channels"] == [1] and not out["coincide"]
    assert [g["channel"] for g in out["top_gate"]] == [1, 5, 3, 7]
    out = an.gate_coincidence([5, 1], gate)
    assert out["coincide"] and out["overlap"] == 1.0
    assert an.gate_coincidence([], gate)["overlap"] is None


def test_massive_rule_matches_the_feature_module():
    from ditf_pipeline.match.features import detect_massive_channels

    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 32)).astype(np.float32)
    z[:, [3, 9]] += np.array([150.0, 60.0])  # 9 sits just around the 100x line
    means = np.abs(z).mean(axis=0)
    summary = an.stage_summary(means, np.zeros_like(means), float(np.median(means)), 100)
    assert summary["massive"] == detect_massive_channels(z)


@pytest.mark.slow
def test_analyze_cli_stores_channels_plots_and_grid(demo, tmp_path):
    root, store_path = demo
    out = tmp_path / "analysis"
    grid = ["--k", 1, "--k", 2, "--t", 90, "--t", 260]  # every stored key: without --k/--t, analyze takes one
    result = _cli("analyze", *_common(root, store_path), *grid, "--match", "--out", out)
    assert result.exit_code == 0, result.output
    assert "c13 " in result.output and "massive channels" in result.output and "|gate| rank" in result.output
    store = FeatureStore(store_path)
    for (k, t), massive in MASSIVE.items():
        arrays = store.open_features("spair", MODEL, k, t)
        assert arrays.group.attrs["massive_channels"] == sorted(massive)
        assert resolve_channels("auto", arrays) == sorted(massive)
        assert _png(out / f"spair-{MODEL}-k{k}-t{t}-magnitude.png") == (1500, 900)
        assert _png(out / f"spair-{MODEL}-k{k}-t{t}-gate.png") == (1500, 450)
        assert _png(out / f"spair-{MODEL}-k{k}-t{t}-pca.png") == (4 * 240, 4 * 240 + 60)
    assert _png(out / f"spair-{MODEL}-pck-grid.png") == (640, 480)
    report = json.loads((out / f"spair-{MODEL}-analysis.json").read_text())
    assert [s["massive_channels"] for s in report["keys"]] == [sorted(m) for m in MASSIVE.values()]
    cells = report["pck_grid"]["cells"]
    assert [(c["k"], c["t"]) for c in cells] == list(MASSIVE) and all(c["pck"] > 80 for c in cells)
    # the stored set is what `--channels auto` reads (not a fresh detection)
    arrays = store.open_features("spair", MODEL, 1, 260)
    arrays.set_massive_channels([2])
    assert resolve_channels("auto", arrays) == [2]
    arrays.set_massive_channels(MASSIVE[(1, 260)])
    # vector figures for papers: the same files as PDF
    pdf = tmp_path / "pdf"
    result = _cli("analyze", *_common(root, store_path), *grid, "--no-write", "--figure-format", "pdf", "--pca-images", 1,
                  "--out", pdf)
    assert result.exit_code == 0, result.output
    assert (pdf / f"spair-{MODEL}-pck-grid.pdf").read_bytes().startswith(b"%PDF")
    assert not list(pdf.glob("*.png"))


def test_channel_discard_recovers_the_accuracy_the_injection_destroyed(demo):
    root, store_path = demo
    store = FeatureStore(store_path)
    dataset = get_dataset("spair", root, "test")
    scores = {}
    for variant in ("raw", "adaln", "adaln+cd"):
        report = predict(store, dataset, MODEL, 1, 260, MatchSettings(variant=variant, channels="auto"), progress=False)
        if variant == "adaln+cd":
            assert report.channels == MASSIVE[(1, 260)]
        scores[variant] = score_pairs(store, dataset, MODEL, 1, 260, f"{variant}/dift")["pck"]["0.1"]["per_point"]["all"]
    assert scores["raw"] < 30, scores
    assert scores["adaln+cd"] > 85, scores


def test_show_draws_keypoints_and_dense_matches(demo, tmp_path):
    root, store_path = demo
    store = FeatureStore(store_path)
    dataset = get_dataset("spair", root, "test")
    predict(store, dataset, MODEL, 1, 260, MatchSettings(variant="raw"), progress=False)
    pair_ids = [p.pair_id for p in dataset.pairs()]
    common = [*_common(root, store_path), "--k", 1, "--t", 260]
    result = _cli("show", *common, "--pair", pair_ids[0], "--pair", "4", "--variant", "raw", "--out", tmp_path / "raw.png")
    assert result.exit_code == 0, result.output
    assert _png(tmp_path / "raw.png") == pl.show_size(2) == (1200, 880)
    result = _cli("show", *common, "--pair", pair_ids[1], "--dense", "--grid", 6, "--out", tmp_path / "dense.png")
    assert result.exit_code == 0, result.output
    assert _png(tmp_path / "dense.png") == (1200, 440)


def test_show_writes_vector_figures_and_scales_png_with_dpi(demo, tmp_path):
    root, store_path = demo
    store = FeatureStore(store_path)
    predict(store, get_dataset("spair", root, "test"), MODEL, 1, 260, MatchSettings(variant="raw"), progress=False)
    common = [*_common(root, store_path), "--k", 1, "--t", 260, "--pair", "1", "--variant", "raw"]
    result = _cli("show", *common, "--figure-format", "pdf", "--out", tmp_path / "fig.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF") and not (tmp_path / "fig.png").exists()
    assert _cli("show", *common, "--out", tmp_path / "fig.svg").exit_code == 0
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()[:2000]
    assert _cli("show", *common, "--dpi", 200, "--out", tmp_path / "big.png").exit_code == 0
    assert _png(tmp_path / "big.png") == (2400, 880)  # same layout, twice the pixels
    bad = _cli("show", *common, "--out", tmp_path / "fig.jpg")
    assert bad.exit_code == 1 and bad.output.startswith("error: --out must be a .png, .pdf or .svg")


def test_pair_view_draws_the_alpha_radius(tmp_path):
    """The dashed alpha x threshold circle around the ground truth changes the picture."""
    image = np.full((60, 80, 3), 200, np.uint8)
    points = np.array([[40.0, 30.0]])
    base = dict(src_image=image, trg_image=image, src_points=points, pred_points=points + 2, trg_truth=points,
                correct=np.array([True]))
    pl.plot_pairs(tmp_path / "plain.png", [pl.PairView(**base)])
    pl.plot_pairs(tmp_path / "radius.png", [pl.PairView(**base, radius=20.0)])
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "radius.png") as b:
        assert np.asarray(a).shape == np.asarray(b).shape and not np.array_equal(np.asarray(a), np.asarray(b))


def test_grid_colour_range_fits_the_values():
    assert pl.grid_colour_range(np.array([[60.0, 67.1], [np.nan, 62.0]])) == (60.0, 67.1)
    assert pl.grid_colour_range(np.array([[50.0, 50.0]])) == (49.0, 51.0)
    assert pl.grid_colour_range(np.array([[np.nan]])) == (0.0, 100.0)


def test_dense_matches_follow_the_features():
    # a target that is the source shifted by 3 tokens: every match moves by 3 * 8 pixels
    rng = np.random.default_rng(1)
    src = rng.normal(size=(10, 14, 16)).astype(np.float32)
    trg = np.roll(src, 3, axis=1)
    points, matched = an.dense_matches(src, (112, 80), trg, (112, 80), n=4, points=np.array([[20.0, 20.0], [44.0, 60.0]]))
    np.testing.assert_allclose(matched, points + [24, 0], atol=2)


def test_keypoint_correct_uses_the_protocol_rule():
    from ditf_pipeline.datasets.base import Pair

    pair = Pair("p", "cat", "a", "b", np.zeros((2, 2)), np.array([[0.0, 0.0], [10.0, 0.0]]), (20, 20), (20, 20), 100.0)
    pred = np.array([[10.0, 0.0], [10.0, 11.0]])  # errors 10 and 11 at threshold 0.1 * 100 = 10
    assert an.keypoint_correct(pred, pair, 0.1, "dift").tolist() == [True, False]
    assert an.keypoint_correct(pred, pair, 0.1, "geoaware").tolist() == [False, False]


def test_pca_rgb_is_deterministic_and_in_range():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(5, 6, 20)), rng.normal(size=(4, 4, 20))]
    a, b = an.pca_rgb(maps), an.pca_rgb([m[..., ::-1][..., ::-1] for m in maps])
    assert [m.shape for m in a] == [(5, 6, 3), (4, 4, 3)]
    assert all(0 <= m.min() and m.max() <= 1 for m in a)
    np.testing.assert_allclose(a[0], b[0])
    few = an.pca_rgb([rng.normal(size=(2, 2, 50))])  # fewer tokens than channels
    assert few[0].shape == (2, 2, 3)


def test_errors_are_one_line(demo, tmp_path):
    root, store_path = demo
    cases = [
        ["analyze", "--model", "flux", "--dataset", "spair", "--data-root", root, "--store", store_path, "--out", tmp_path],
        ["analyze", *_common(root, store_path), "--k", 7, "--out", tmp_path],
        ["analyze", *_common(root, tmp_path / "missing.zarr"), "--no-write", "--out", tmp_path],
        ["analyze", *_common(root, tmp_path / "missing.zarr"), "--out", tmp_path],
        ["show", *_common(root, store_path), "--k", 1, "--t", 260, "--pair", "no-such-pair"],
        ["show", *_common(root, store_path), "--k", 1, "--t", 260, "--pair", "1", "--variant", "adaln-t"],
        ["show", *_common(root, store_path), "--pair", "1"],  # several keys: needs --k/--t
        ["show", *_common(root, store_path), "--k", 1, "--t", 260],  # no --pair
    ]
    for args in cases:
        result = _cli(*args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
    assert not (tmp_path / "missing.zarr").exists()  # a mistyped --store is not created


def test_find_pairs_by_id_number_or_prefix():
    from types import SimpleNamespace

    pairs = [SimpleNamespace(pair_id=i) for i in ("000001-a-b:cat", "000010-a-c:cat", "000100-b-c:dog")]
    assert [p.pair_id for p in an.find_pairs(pairs, ["1", "000010", "000100-b-c:dog", "000001-a"])] == [
        "000001-a-b:cat", "000010-a-c:cat", "000100-b-c:dog", "000001-a-b:cat"]
    with pytest.raises(Exception, match="3 pairs match"):
        an.find_pairs(pairs, ["0"])
    with pytest.raises(Exception, match="no pair match"):
        an.find_pairs(pairs, ["7"])


def test_plots_and_statistics_modules_import_no_torch():
    import subprocess
    import sys

    code = "import sys, ditf_pipeline.analysis.plots, ditf_pipeline.analysis.analyze; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
