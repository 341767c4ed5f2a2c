"""`ditf view` through its HTTP API (FastAPI's TestClient), on a synthetic store: no model, no browser.

The store holds random features with a bump per keypoint, a partner key without AdaLN and
`ditf match`'s predictions (raw, adaln, adaln+cd and a fused variant), so every answer of the
view can be checked against what the match stage stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ditf_cli.main import app as cli_app  # noqa: E402
from ditf_pipeline.analysis.analyze import keypoint_correct  # noqa: E402
from ditf_pipeline.datasets import get_dataset  # noqa: E402
from ditf_pipeline.demo import make_spair_demo  # noqa: E402
from ditf_pipeline.match.matchers import DiftMatcher, dift_reference_similarity, upsampled_vectors  # noqa: E402
from ditf_pipeline.match.predict import MatchSettings, predict  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402
from ditf_pipeline.view.app import create_app  # noqa: E402
from ditf_pipeline.view.explorer import Explorer  # noqa: E402

D, STRIDE, MODEL, PARTNER = 48, 8, "synthetic", "synthetic-dino"
KEY = {"dataset": "spair", "model": MODEL, "k": 2, "t": 260}
VARIANTS = ["raw", "adaln", "adaln+cd"]
FUSED = "adaln+cd+synthetic-dino-pca16"


def _features(size, kps, rng, massive=(5,), dim=D):
    width, height = size
    rows, cols = -(-height // STRIDE), -(-width // STRIDE)
    z = rng.normal(0.0, 0.3, size=(rows, cols, dim))
    rr, cc = np.mgrid[0:rows, 0:cols]
    for j, point in enumerate(kps):
        if point is not None:
            u, v = (point[0] + 0.5) * cols / width - 0.5, (point[1] + 0.5) * rows / height - 0.5
            z[..., 8 + j] += 4.0 * np.exp(-((rr - v) ** 2 + (cc - u) ** 2) / 1.3)
    for c in massive:
        z[..., c] = 500.0 * (1 + 0.1 * rng.standard_normal((rows, cols)))
    return z.astype(np.float16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("view")
    root = make_spair_demo(base / "SPair", pairs_per_category=2)
    data = get_dataset("spair", root)
    records = data.images()
    kps = {r.key: list(json.loads((root / "ImageAnnotation" / r.key).with_suffix(".json").read_text())["kps"].values())
           for r in records}
    sizes = {r.key: Image.open(r.path).size for r in records}
    store = FeatureStore(base / "s.zarr")
    rows = store.register_images("spair", [r.key for r in records], [sizes[r.key] for r in records])
    grid = (max(-(-h // STRIDE) for _, h in sizes.values()), max(-(-w // STRIDE) for w, _ in sizes.values()))
    arrays = store.open_features("spair", MODEL, 2, 260, config={"synthetic": True}, n_images=len(records), grid_max=grid, hidden_size=D)
    partner = store.open_features("spair", PARTNER, 11, 0, config={"synthetic": True}, n_images=len(records), grid_max=grid,
                                  hidden_size=24, adaln=False)
    modulation = {name: np.random.default_rng(i).normal(0, 0.05, D) for i, name in enumerate(["shift", "scale", "gate"])}
    for i, r in enumerate(records):
        arrays.write_image(rows[r.key], _features(sizes[r.key], kps[r.key], np.random.default_rng(i)), modulation)
        partner.write_image(rows[r.key], _features(sizes[r.key], kps[r.key], np.random.default_rng(100 + i), (), 24), {})
    for variant in VARIANTS:
        predict(store, data, MODEL, 2, 260, MatchSettings(variant=variant), progress=False)
    predict(store, data, MODEL, 2, 260, MatchSettings(variant="adaln+cd", fuse=PARTNER, pca_dim=16), progress=False)
    explorer = Explorer(base / "s.zarr", root, None, base / "uploads")
    return {"root": root, "store": base / "s.zarr", "data": data, "explorer": explorer, "client": _client(explorer)}


def _client(explorer, **app_options):
    """A client as the page is one: a loopback Host, and the run's token on every request."""
    app = create_app(explorer, **app_options)
    return TestClient(app, base_url="http://127.0.0.1:8765", headers={"X-Ditf-Token": app.state.token})


def _stored(demo, name):
    store = FeatureStore(demo["store"], read_only=True)
    return store.open_predictions(("spair", MODEL, 2, 260), name).read()


@pytest.mark.slow  # a fresh interpreter importing torch
def test_core_install_never_imports_fastapi():
    code = ("import sys, ditf_cli.main, ditf_pipeline.view, ditf_pipeline.view.explorer, ditf_pipeline.view.queries; "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_keys_list_variants_predictions_and_fused(demo):
    answer = demo["client"].get("/api/keys").json()
    keys = {k["id"]: k for k in answer["keys"]}
    key = keys["spair/synthetic/k2/t260"]
    assert key["variants"] == VARIANTS + [FUSED]
    assert set(key["predictions"]) == {f"{v}/dift" for v in VARIANTS + [FUSED]}
    assert keys["spair/synthetic-dino/k11/t0"]["variants"] == ["raw"]
    assert answer["data_root"] and answer["uploads"]


def test_pairs_sorted_by_the_stored_pck(demo):
    client, pairs = demo["client"], demo["data"].pairs()
    answer = client.get("/api/pairs", params={**KEY, "variant": "raw", "alpha": 0.1, "order": "pck"}).json()
    stored = _stored(demo, "raw/dift")
    expected = {p.pair_id: float(np.mean(keypoint_correct(stored[p.pair_id], p, 0.1, "dift"))) for p in pairs}
    assert {r["pair_id"]: r["pck"] for r in answer["pairs"]} == pytest.approx(expected)
    listed = [r["pck"] for r in answer["pairs"]]
    assert listed == sorted(listed) and answer["pck_from"] == "raw/dift"
    cat = client.get("/api/pairs", params={**KEY, "category": "cat"}).json()
    assert {r["category"] for r in cat["pairs"]} == {"cat"} and len(cat["pairs"]) == 2
    missing = client.get("/api/pairs", params={**KEY, "protocol": "geoaware"}).json()
    assert all(r["pck"] is None for r in missing["pairs"]) and "run `ditf match" in missing["note"]


@pytest.mark.parametrize("variant", VARIANTS + [FUSED])
def test_a_keypoint_click_predicts_what_ditf_match_stored(demo, variant):
    stored = _stored(demo, f"{variant}/dift")
    for pair in demo["data"].pairs():
        opened = demo["client"].get("/api/pair", params={**KEY, "pair_id": pair.pair_id, "variants": variant}).json()
        entry = opened["variants"][variant]
        assert entry["source"] == "stored" and entry["agrees"] is True
        assert entry["correct"] == keypoint_correct(stored[pair.pair_id], pair, 0.1, "dift").tolist()
        for i in range(len(pair.src_kps)):
            answer = demo["client"].post("/api/click", json={**KEY, "pair_id": pair.pair_id, "variants": [variant], "keypoint": i})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["results"][0]["pred"] == stored[pair.pair_id][i].tolist()
            assert body["gt"] == pair.trg_kps[i].tolist() and body["radius"] == pytest.approx(0.1 * pair.threshold_base)


def test_a_point_click_gives_the_cell_cosines_and_the_exact_argmax(demo):
    pair = demo["data"].pairs()[1]
    explorer = demo["explorer"]
    key = explorer.key(**KEY)
    answer = demo["client"].post("/api/click", json={**KEY, "pair_id": pair.pair_id, "variants": VARIANTS, "x": 37.4, "y": 50.6}).json()
    assert answer["point"] == [37, 51]
    for result in answer["results"]:
        maps = explorer._maps_for(key, pair, result["variant"])
        vector = upsampled_vectors(maps.src, pair.src_size, np.array([37]), np.array([51]))[0].numpy()
        cells = maps.trg.numpy().reshape(-1, maps.trg.shape[-1])
        cosine = cells @ vector / np.linalg.norm(cells, axis=1) / np.linalg.norm(vector)
        heat = result["heatmap"]
        assert (heat["rows"], heat["cols"]) == tuple(maps.trg.shape[:2])
        assert np.asarray(heat["values"]) == pytest.approx(cosine, abs=2e-4)
        assert result["pred"] == DiftMatcher().match(maps.src, pair.src_size, maps.trg, pair.trg_size, [[37, 51]])[0].tolist()
        # and it is the maximum of the naive full-resolution cosine map (up to float rounding among near ties)
        full = dift_reference_similarity(maps.src, pair.src_size, maps.trg, pair.trg_size, np.array([[37, 51]]))[0]
        px, py = (int(v) for v in result["pred"])
        assert float(full[py, px]) >= float(full.max()) - 1e-5


def test_stored_predictions_drive_the_marks_and_geoaware_is_computed(demo):
    pair = demo["data"].pairs()[0]
    body = demo["client"].get("/api/pair", params={**KEY, "pair_id": pair.pair_id, "protocol": "geoaware", "alpha": 0.05}).json()
    for entry in body["variants"].values():
        assert entry["source"] == "computed"
        assert entry["correct"] == keypoint_correct(np.asarray(entry["pred"]), pair, 0.05, "geoaware").tolist()
    by_number = demo["client"].get("/api/pair", params={**KEY, "pair_id": "1"}).json()
    assert by_number["pair_id"] == demo["data"].pairs()[0].pair_id


BAD_GETS = [
    ("/api/image?dataset=spair&key=../../etc/passwd", 404),
    ("/api/image?dataset=spair&key=%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
    ("/api/image?dataset=spair&key=%2Fetc%2Fpasswd", 404),
    ("/api/image?dataset=..%2F..&key=passwd", 404),
    ("/api/image?dataset=uploads&key=..%2F..%2Fetc%2Fpasswd", 404),
    ("/..%2f..%2fetc/passwd", 404),
    ("/static/../../etc/passwd", 404),
    ("/api/pairs?dataset=spair&model=synthetic&k=two&t=260", 422),
    ("/api/pairs?dataset=spair&model=synthetic&k=2", 422),
    ("/api/pairs?dataset=spair&model=synthetic&k=2&t=260&alpha=7", 422),
    ("/api/pairs?dataset=spair&model=nope&k=2&t=260", 404),
    ("/api/pairs?dataset=spair&model=synthetic&k=3&t=260", 404),
    ("/api/pairs?dataset=spair&model=synthetic&k=2&t=260&protocol=magic", 400),
    ("/api/pairs?dataset=spair&model=synthetic&k=2&t=260&category=dog", 404),
    ("/api/pair?dataset=spair&model=synthetic&k=2&t=260&pair_id=999999", 404),
    ("/api/pair?dataset=spair&model=synthetic&k=2&t=260&pair_id=1&variants=adaln-t", 400),
    ("/api/pca.png?dataset=spair&model=synthetic&k=2&t=260&pair_id=..%2F..%2Fetc", 404),
]


@pytest.mark.parametrize(("url", "status"), BAD_GETS)
def test_bad_get_requests_get_a_4xx_with_a_message(demo, url, status):
    response = demo["client"].get(url)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert "root:" not in response.text  # nothing of /etc/passwd ever comes back


def _click(**change):
    return {**KEY, "pair_id": "1", "variants": ["raw"], "x": 10, "y": 10, **change}


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 422, "not valid JSON"),
    (b"[1, 2]", 422, "bad request"),
    (json.dumps(_click(x="left")).encode(), 422, "x"),
    (json.dumps({**_click(), "k": None}).encode(), 422, "k"),
    (json.dumps(_click(x=10_000)).encode(), 400, "outside the source image"),
    (json.dumps(_click(x=-1)).encode(), 400, "outside the source image"),
    (json.dumps(_click(x=float("nan"))).encode(), 400, "finite"),
    (json.dumps(_click(x=None, y=None)).encode(), 400, "give a point"),
    (json.dumps(_click(keypoint=99)).encode(), 400, "keypoint 99"),
    (json.dumps(_click(variants=["nope"])).encode(), 400, "unknown variant"),
    (json.dumps(_click(variants=[])).encode(), 422, "variants"),
    (json.dumps(_click(model="ghost")).encode(), 404, "no features"),
    (json.dumps(_click(pair_id="../../etc/passwd")).encode(), 404, "no pair"),
])
def test_malformed_clicks_get_a_4xx_with_a_message(demo, body, status, words):
    response = demo["client"].post("/api/click", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_server_keeps_serving_and_never_writes_the_store(demo):
    before = {p: p.stat().st_mtime_ns for p in demo["store"].rglob("*")}
    client = demo["client"]
    client.get("/api/pca.png", params={**KEY, "pair_id": "1"})
    client.post("/api/click", json=_click())
    assert demo["explorer"].store.read_only
    assert {p: p.stat().st_mtime_ns for p in demo["store"].rglob("*")} == before
    assert client.get("/api/keys").status_code == 200


def test_images_are_served_by_key_only_and_inside_the_root(demo, tmp_path):
    client, pair = demo["client"], demo["data"].pairs()[0]
    response = client.get("/api/image", params={"dataset": "spair", "key": pair.src_key})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    explorer = Explorer(demo["store"], demo["root"], None, None)
    index = explorer._dataset("spair")
    index.paths[pair.src_key] = demo["root"] / "JPEGImages" / os.path.relpath(outside, demo["root"] / "JPEGImages")
    assert index.paths[pair.src_key].resolve() == outside.resolve()  # a real file, reached through ".."
    sneaky = _client(explorer).get("/api/image", params={"dataset": "spair", "key": pair.src_key})
    assert sneaky.status_code == 404 and b"secret" not in sneaky.content


def test_key_figures_are_png(demo):
    client = demo["client"]
    for url, params in [("/api/magnitude.png", KEY), ("/api/pca.png", {**KEY, "pair_id": "2"})]:
        response = client.get(url, params=params)
        assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_is_served(demo):
    page = demo["client"].get("/")
    assert page.status_code == 200 and "ditf view" in page.text and "/api/click" in page.text


def test_cli_view_refuses_a_missing_store_in_one_line(tmp_path):
    result = CliRunner().invoke(cli_app, ["view", "--store", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_uploads_refuse_what_is_not_an_image(demo):
    response = demo["client"].post("/api/upload", json={"model": "tiny-flux", "source": "aGVsbG8=", "target": "aGVsbG8="})
    assert response.status_code == 400 and "not a readable image" in response.json()["error"]
    response = demo["client"].post("/api/upload", json={"model": "tiny-flux", "source": "***", "target": "aGVsbG8="})
    assert response.status_code == 400 and "base64" in response.json()["error"]
    images = demo["explorer"].uploads.images
    assert not images.exists() or not list(images.iterdir())
