"""`ditf view` in a real browser: headless Chromium (Debian package) driven by Playwright.

A tiny-flux SPair demo store is built in-process (`ditf extract` + `ditf match`), the app runs
under uvicorn on a free 127.0.0.1 port, and the browser opens the page, chooses a pair, clicks a
keypoint and reads the heatmaps and predicted points back from the page. Outside CI the test
skips when no browser can start; under CI=true it fails instead.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ditf_pipeline.demo import make_spair_demo  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402
from ditf_pipeline.view.app import create_app  # noqa: E402
from ditf_pipeline.view.explorer import Explorer  # noqa: E402
from ditf_pipeline.view.server import server_config  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("DITF_CHROMIUM", "/usr/bin/chromium")
VARIANTS = ["raw", "adaln", "adaln+cd"]
#: set to a folder to keep the screenshots (docs/images/view.png, shown in docs/explore.md, comes from here)
SCREENSHOT_DIR = os.environ.get("DITF_VIEW_SCREENSHOTS")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ditf_pipeline.pipeline import run_match
    from ditf_pipeline.pipeline import run_extract

    base = tmp_path_factory.mktemp("view-browser")
    root = make_spair_demo(base / "SPair", pairs_per_category=2)
    store = base / "ditf.zarr"
    report = run_extract(model="tiny-flux", dataset="spair", data_root=root, store=store, img_size=128, ensemble_size=2,
                         dtype="fp32", progress=False)
    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    matched = run_match(model="tiny-flux", dataset="spair", data_root=root, store=store, k=[k], t=[t], variants=VARIANTS,
                        progress=False)
    data, k, t = matched.data, matched.k, matched.t
    return {"root": root, "store": store, "data": data, "k": k, "t": t, "uploads": base / "uploads"}


@pytest.fixture(scope="module")
def server(demo):
    uvicorn = pytest.importorskip("uvicorn")
    explorer = Explorer(demo["store"], demo["root"], None, demo["uploads"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(explorer)
    config = server_config(app)
    config.host, config.port = "127.0.0.1", port
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "explorer": explorer, "token": app.state.token}
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    manager = sync_playwright().start()
    try:
        launched = manager.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    except Exception as exc:  # noqa: BLE001 - any launch failure means "no browser here"
        manager.stop()
        _unavailable(f"Chromium does not start: {exc}")
    yield launched
    launched.close()
    manager.stop()


def _stored(demo, variant):
    store = FeatureStore(demo["store"], read_only=True)
    return store.open_predictions(("spair", "tiny-flux", demo["k"], demo["t"]), f"{variant}/dift").read()


def test_click_a_keypoint_in_the_browser(browser, demo, server, tmp_path):
    pair = demo["data"].pairs()[1]
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server["url"] + "/?token=" + server["token"])
    page.wait_for_function("document.querySelectorAll('#pair option').length > 0")
    page.select_option("#pair", pair.pair_id)
    page.wait_for_function(f"document.body.dataset.pair === {pair.pair_id!r}")
    assert page.locator(".target-panel").count() == len(VARIANTS)
    assert page.locator("#kps tr[data-kp]").count() == len(pair.src_kps)

    keypoint = 2
    x, y = pair.src_kps[keypoint]
    box = page.locator("#src-overlay").bounding_box()
    scale = box["width"] / pair.src_size[0]
    page.mouse.click(box["x"] + (x + 0.5) * scale + 2, box["y"] + (y + 0.5) * scale - 2)  # near it: snaps
    for variant in VARIANTS:
        panel = page.locator(f'.target-panel[data-variant="{variant}"]')
        panel.locator('canvas.heat[data-heatmap="drawn"]').wait_for()
        page.wait_for_function(
            f"document.querySelector('.target-panel[data-variant=\"{variant}\"]').dataset.keypoint === '{keypoint}'")
        predicted = [float(panel.get_attribute("data-pred-x")), float(panel.get_attribute("data-pred-y"))]
        assert predicted == _stored(demo, variant)[pair.pair_id][keypoint].tolist(), variant
        painted = page.evaluate(
            """(variant) => { const c = document.querySelector(`.target-panel[data-variant="${variant}"] canvas.heat`);
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n / (c.width * c.height); }""",
            variant)
        assert painted > 0.95  # the heatmap covers the target
        marks = page.evaluate(
            """(variant) => { const c = document.querySelector(`.target-panel[data-variant="${variant}"] canvas.marks`);
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""",
            variant)
        assert marks > 20  # prediction cross, ground truth and the alpha circle are drawn
    assert "keypoint 2" in page.inner_text("#status")
    assert page.locator("#kps tr.active").get_attribute("data-kp") == str(keypoint)
    assert not errors, errors

    # the same page, against the server: traversal and a malformed request are refused with a message
    traversal = page.request.get(server["url"] + "/api/image?dataset=spair&key=..%2F..%2F..%2Fetc%2Fpasswd")
    assert traversal.status == 404 and "no image" in traversal.json()["error"]
    raw_traversal = page.request.get(server["url"] + "/%2e%2e/%2e%2e/etc/passwd")
    assert raw_traversal.status == 404 and "root:" not in raw_traversal.text()
    malformed = page.request.post(server["url"] + "/api/click", data=b"{oops",
                                  headers={"content-type": "application/json", "x-ditf-token": server["token"]})
    assert malformed.status == 422 and "not valid JSON" in malformed.json()["error"]

    shot = tmp_path / "view.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(SCREENSHOT_DIR) / "view.png")
    page.close()


def test_upload_two_images_and_query_them(demo, server):
    """The upload path: decoded, extracted with tiny-flux through `ditf_pipeline.extract.extractor`, cached, clickable."""
    app = create_app(server["explorer"])
    client = TestClient(app, base_url="http://127.0.0.1", headers={"X-Ditf-Token": app.state.token})
    images = sorted((demo["root"] / "JPEGImages" / "cat").glob("*.jpg"))[:2]
    body = {"model": "tiny-flux", "source": base64.b64encode(images[0].read_bytes()).decode(),
            "target": "data:image/jpeg;base64," + base64.b64encode(images[1].read_bytes()).decode()}
    answer = client.post("/api/upload", json={**body, "t": 260})
    assert answer.status_code == 200, answer.text
    key, pair_id = answer.json()["key"], answer.json()["pair_id"]
    assert key["dataset"] == "uploads" and key["model"] == "tiny-flux"
    assert (demo["uploads"] / "features.zarr").is_dir()
    assert not (demo["store"] / "folder").exists()  # the main store is untouched
    keys = [k["id"] for k in client.get("/api/keys").json()["keys"]]
    assert key["id"] in keys
    params = {k: key[k] for k in ("dataset", "model", "k", "t")}
    listed = client.get("/api/pairs", params=params).json()["pairs"]
    assert [p["pair_id"] for p in listed] == [pair_id]
    click = client.post("/api/click", json={**params, "pair_id": pair_id, "variants": VARIANTS, "x": 40, "y": 30})
    assert click.status_code == 200, click.text
    for result in click.json()["results"]:
        assert len(result["heatmap"]["values"]) == result["heatmap"]["rows"] * result["heatmap"]["cols"]
        assert np.isfinite(result["pred"]).all()
    image = client.get("/api/image", params={"dataset": "uploads", "key": pair_id.split("-")[0]})
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    again = client.post("/api/upload", json={**body, "t": 260})  # same bytes: same ids, features reused
    assert again.json()["pair_id"] == pair_id
    assert "tiny-flux" in client.get("/api/models").json()["models"]
    unknown = client.post("/api/upload", json={**body, "model": "no-such-model"})
    assert unknown.status_code == 400 and "no-such-model" in unknown.json()["error"]


def test_upload_in_the_browser(browser, demo, server):
    """The page's upload form: two files in, the uploads key selected, the pair opened and clickable."""
    images = sorted((demo["root"] / "JPEGImages" / "car").glob("*.jpg"))[:2]
    ids = [hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in images]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server["url"] + "/?token=" + server["token"])
    page.wait_for_function("document.querySelectorAll('#pair option').length > 0")
    page.click("#upload-box summary")
    page.wait_for_function("document.querySelectorAll('#up-model option').length > 0")
    page.set_input_files("#up-src", str(images[0]))
    page.set_input_files("#up-trg", str(images[1]))
    page.select_option("#up-model", "tiny-flux")
    page.fill("#up-t", "260")
    page.click("#up-go")
    page.wait_for_function(f"document.body.dataset.pair === '{ids[0]}-{ids[1]}'", timeout=120_000)
    assert page.input_value("#key").startswith("uploads/tiny-flux/")
    box = page.locator("#src-overlay").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    panel = page.locator('.target-panel[data-variant="adaln+cd"]')
    panel.locator('canvas.heat[data-heatmap="drawn"]').wait_for()
    assert panel.get_attribute("data-pred-x") is not None
    assert not errors, errors
    page.close()


def test_a_dns_rebinding_page_reads_and_posts_nothing(browser, server):
    """A name of an attacker's that resolves to 127.0.0.1 (Chromium's resolver rules play the DNS):
    to the browser the app is then same-origin with the attacker's page, so only the Host check
    stands between that page and the store's data."""
    port = server["url"].rsplit(":", 1)[1]
    rebound = browser.browser_type.launch(
        executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP rebound.test 127.0.0.1"])
    try:
        page = rebound.new_page()
        response = page.goto(f"http://rebound.test:{port}/")
        assert response.status == 403 and "not served here" in page.content()
        statuses = page.evaluate(
            """async () => [(await fetch('/api/keys')).status,
                            (await fetch('/api/models')).status,
                            (await fetch('/api/click', {method: 'POST', headers: {'content-type': 'application/json'},
                                                        body: '{}'})).status]""")
        assert statuses == [403, 403, 403]
        own = page.goto(server["url"] + "/")  # the same browser, the real address: served
        assert own.status == 200
    finally:
        rebound.close()
