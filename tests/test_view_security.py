"""`ditf view` against other web pages and careless input: Host, token, limits, binding, freshness.

The app is driven through FastAPI's TestClient (a request with any Host header, any body) on a
small synthetic store; the header timeout runs a real uvicorn server on a free loopback port,
and binding goes through the CLI with the serving loop replaced.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ditf_cli.main import app as cli_app  # noqa: E402
from ditf_pipeline.datasets import get_dataset  # noqa: E402
from ditf_pipeline.demo import make_spair_demo  # noqa: E402
from ditf_pipeline.store.feature_store import FeatureStore  # noqa: E402
from ditf_pipeline.view import queries  # noqa: E402
from ditf_pipeline.view import uploads as uploads_module  # noqa: E402
from ditf_pipeline.view.app import create_app  # noqa: E402
from ditf_pipeline.view.explorer import Explorer  # noqa: E402
from ditf_pipeline.view.uploads import Uploads  # noqa: E402
from test_object_store import s3  # noqa: E402,F401 - the moto S3 server fixture (skips without moto[server])

D, STRIDE = 16, 8
MODEL = "tiny-flux"  # a registered name: its default key (k2/t260) is what the view opens on
KEY = {"dataset": "spair", "model": MODEL, "k": 2, "t": 260}


def _build(store: Path | str, root: Path, records, seed: int, keys=((2, 260),), reverse: bool = False) -> None:
    """A store of random features for every image of `root` (rows in reverse order when asked)."""
    order = list(reversed(records)) if reverse else list(records)
    sizes = {r.key: Image.open(r.path).size for r in order}
    fs = FeatureStore(store)
    rows = fs.register_images("spair", [r.key for r in order], [sizes[r.key] for r in order])
    grid = (max(-(-h // STRIDE) for _, h in sizes.values()), max(-(-w // STRIDE) for w, _ in sizes.values()))
    for k, t in keys:
        arrays = fs.open_features("spair", MODEL, k, t, config={"synthetic": True}, n_images=len(order), grid_max=grid,
                                  hidden_size=D)
        modulation = {name: np.zeros(D) for name in ("shift", "scale", "gate")}
        for i, r in enumerate(order):
            w, h = sizes[r.key]
            rng = np.random.default_rng(seed * 1000 + i)
            arrays.write_image(rows[r.key], rng.normal(size=(-(-h // STRIDE), -(-w // STRIDE), D)).astype(np.float16),
                               modulation)
    fs.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("view-security")
    root = make_spair_demo(base / "SPair", pairs_per_category=1)
    records = get_dataset("spair", root).images()
    _build(base / "s.zarr", root, records, seed=1, keys=[(1, 100), (2, 260)])
    return {"base": base, "root": root, "records": records, "store": base / "s.zarr"}


def _client(explorer, token=True, **options):
    app = create_app(explorer, **options)
    headers = {"X-Ditf-Token": getattr(app.state, "token", "")} if token else {}
    return TestClient(app, base_url="http://127.0.0.1:8765", headers=headers)


@pytest.fixture()
def client(demo, tmp_path):
    return _client(Explorer(demo["store"], demo["root"], None, tmp_path / "uploads"))


def _png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its pixel data is a 1x1 image's: never decodable)."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _jpeg(size=(64, 48), seed=0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


# ---- Host allow-list (DNS rebinding) -------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.nip.io:8765", "", "0.0.0.0:8765"])
def test_a_rebound_host_name_is_refused_reads_included(client, host):
    response = client.get("/api/keys", headers={"host": host})
    assert response.status_code == 403 and "not served here" in response.json()["error"]
    page = client.get("/", headers={"host": host})
    assert page.status_code == 403 and "<html" not in page.text.lower()


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.1"])
def test_loopback_hosts_and_added_names_are_served(client, demo, tmp_path, host):
    assert client.get("/api/keys", headers={"host": host}).status_code == 200
    extra = _client(Explorer(demo["store"], demo["root"], None, None), hosts={"127.0.0.1", "box.lan"})
    assert extra.get("/api/keys", headers={"host": "box.lan:8765"}).status_code == 200


# ---- the token -----------------------------------------------------------------------------------
def test_every_post_needs_the_runs_token(demo, tmp_path):
    explorer = Explorer(demo["store"], demo["root"], None, tmp_path / "uploads")
    bare = _client(explorer, token=False)
    click = {**KEY, "pair_id": "1", "variants": ["raw"], "x": 5, "y": 5}
    upload = {"model": MODEL, "source": base64.b64encode(_jpeg()).decode(), "target": base64.b64encode(_jpeg()).decode()}
    for path, body in [("/api/click", click), ("/api/upload", upload)]:
        assert bare.post(path, json=body).status_code == 403
        wrong = bare.post(path, json=body, headers={"X-Ditf-Token": "guess"})
        assert wrong.status_code == 403 and "token" in wrong.json()["error"]
    assert bare.post("/api/click", content=json.dumps(click), headers={"content-type": "text/plain"}).status_code == 403
    assert not (tmp_path / "uploads").exists()  # nothing was decoded or written
    assert bare.get("/api/keys").status_code == 200  # reads need no token (the Host check guards them)
    good = bare.post("/api/click", json=click, headers={"X-Ditf-Token": bare.app.state.token})
    assert good.status_code == 200, good.text


def test_the_page_sends_the_token_it_was_opened_with(client):
    page = client.get("/").text
    assert 'get("token")' in page and '"X-Ditf-Token": TOKEN' in page


# ---- bounded bodies, pixels, disk ----------------------------------------------------------------
def test_an_oversized_body_is_refused_with_413(client):
    big = json.dumps({**KEY, "pair_id": "1", "variants": ["raw"] * 10, "x": 5, "y": 5, "pad": "x" * 200_000})
    response = client.post("/api/click", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "too large" in response.json()["error"]

    def chunks():  # no Content-Length: the limit holds on the bytes actually sent
        for _ in range(100):
            yield b" " * 10_000

    streamed = client.post("/api/click", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    declared = client.post("/api/upload", content=b"{}", headers={"content-type": "application/json",
                                                                   "content-length": str(10**9)})
    assert declared.status_code == 413


def test_a_huge_image_is_refused_from_its_header_before_any_decoding(client, monkeypatch):
    decoded = []
    monkeypatch.setattr("ditf_pipeline.core.images.load_rgb", lambda *a, **k: decoded.append(a) or 1 / 0)
    bomb = base64.b64encode(_png(9400, 9400)).decode()
    response = client.post("/api/upload", json={"model": MODEL, "source": bomb, "target": bomb})
    assert response.status_code == 400, response.text
    assert "9400x9400" in response.json()["error"] and "limit" in response.json()["error"]
    assert decoded == []


def test_uploads_are_downscaled_and_the_folder_is_bounded(tmp_path):
    uploads = Uploads(tmp_path / "up", max_bytes=400_000)
    wide = _jpeg((uploads_module.MAX_STORED_SIDE + 500, 40), seed=1)
    stored = Image.open(uploads.image_path(uploads.add_image(wide)))
    assert max(stored.size) == uploads_module.MAX_STORED_SIDE
    with pytest.raises(Exception, match="uploads folder is full"):
        for seed in range(2, 40):
            uploads.add_image(_jpeg((200, 200), seed=seed))
    assert uploads.used_bytes() <= 400_000 + 200 * 200 * 3 + 10_000  # never more than one upload beyond it


def test_the_same_image_uploaded_twice_at_once_is_stored_once_without_error(tmp_path, monkeypatch):
    """Both requests write their PNG before either renames it (a barrier after `save`) when nothing serialises them."""
    uploads = Uploads(tmp_path / "up")
    data = _jpeg(seed=5)  # before `save` is patched
    barrier = threading.Barrier(2, timeout=3)
    save = Image.Image.save

    def meeting_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        try:  # both PNGs written before either is renamed into place
            barrier.wait()
        except threading.BrokenBarrierError:  # the other upload is not writing at the same time
            pass

    monkeypatch.setattr(Image.Image, "save", meeting_save)
    results, errors = [], []

    def add():
        try:
            results.append(uploads.add_image(data))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert sorted(p.name for p in uploads.images.iterdir()) == [f"{results[0]}.png"]


def test_uploads_run_only_the_models_the_page_offers(client, monkeypatch):
    loaded = []
    monkeypatch.setattr("ditf_pipeline.models.load_adapter", lambda *a, **k: loaded.append(a) or 1 / 0)
    offered = client.get("/api/models").json()["models"]
    assert "flux" not in offered and MODEL in offered
    image = base64.b64encode(_jpeg()).decode()
    for model in ["flux", "no-such-model"]:
        response = client.post("/api/upload", json={"model": model, "source": image, "target": image})
        assert response.status_code == 400 and "not offered" in response.json()["error"], response.text
    assert loaded == []
    assert not client.app.state.explorer.uploads.images.exists()


def test_errors_carry_no_absolute_path(demo):
    explorer = Explorer(demo["store"], demo["root"], None, None)
    app = create_app(explorer)
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)

    def crash():
        raise RuntimeError(f"cannot open {demo['store']}/spair/zarr.json")

    explorer.describe_keys = crash
    response = client.get("/api/keys")
    assert response.status_code == 500 and "RuntimeError" in response.json()["error"]
    assert str(demo["base"]) not in response.text
    missing = client.get("/api/pairs", params={**KEY, "model": "ghost"})
    assert missing.status_code == 404 and str(demo["base"]) not in missing.text


# ---- freshness and the default key ---------------------------------------------------------------
def test_the_view_opens_on_the_models_default_key(client):
    answer = client.get("/api/keys").json()
    assert [k["id"] for k in answer["keys"]][0] == "spair/tiny-flux/k1/t100"  # first in the store, not the default
    assert answer["default"] == "spair/tiny-flux/k2/t260" and answer["note"] is None


def test_default_key_rule():
    labels = ["a/m/k1/t1", "a/m/k2/t2"]
    keys = [("m", 1, 1), ("m", 2, 2)]
    assert queries.default_key(labels, keys, {"m": (2, 2)}) == ("a/m/k2/t2", None)
    assert queries.default_key(labels[:1], keys[:1], {}) == ("a/m/k1/t1", None)
    label, note = queries.default_key(labels, keys, {})
    assert label == "a/m/k1/t1" and "2 keys" in note
    assert queries.default_key([], [], {}) == (None, None)


def test_a_store_rebuilt_underneath_is_reread_never_serving_another_images_row(demo, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    _build(store, demo["root"], demo["records"], seed=1)
    client = _client(Explorer(store, demo["root"], None, None))
    click = {**KEY, "pair_id": "1", "variants": ["raw"], "x": 20, "y": 20}
    before = client.post("/api/click", json=click).json()
    shutil.rmtree(store)  # the same images, registered in the opposite order, other features
    _build(store, demo["root"], demo["records"], seed=2, reverse=True)
    after = client.post("/api/click", json=click).json()
    fresh = _client(Explorer(store, demo["root"], None, None)).post("/api/click", json=click).json()
    assert after["results"] == fresh["results"]
    assert before["results"] != after["results"]


def test_keys_and_predictions_added_after_start_are_seen(demo, tmp_path):
    from ditf_pipeline.match.predict import MatchSettings, predict

    store = tmp_path / "s.zarr"
    _build(store, demo["root"], demo["records"], seed=3)
    client = _client(Explorer(store, demo["root"], None, None))
    assert [k["id"] for k in client.get("/api/keys").json()["keys"]] == ["spair/tiny-flux/k2/t260"]
    _build(store, demo["root"], demo["records"], seed=4, keys=[(5, 500)])  # `ditf extract` of another key
    fs = FeatureStore(store)
    predict(fs, get_dataset("spair", demo["root"]), MODEL, 2, 260, MatchSettings(variant="raw"), progress=False)
    fs.close()
    keys = {k["id"]: k for k in client.get("/api/keys").json()["keys"]}
    assert set(keys) == {"spair/tiny-flux/k2/t260", "spair/tiny-flux/k5/t500"}
    assert keys["spair/tiny-flux/k2/t260"]["predictions"] == ["raw/dift"]
    listed = client.get("/api/pairs", params={**KEY, "variant": "raw"}).json()
    assert listed["pck_from"] == "raw/dift" and listed["note"] is None


# ---- binding, the CLI ----------------------------------------------------------------------------
@pytest.fixture()
def served(monkeypatch):
    """`ditf view` up to the serving loop: what it would serve, on which socket."""
    calls = []

    def serve(explorer, sock, token, hosts, threads=1):
        calls.append({"explorer": explorer, "port": sock.getsockname()[1], "token": token, "hosts": hosts})
        sock.close()

    monkeypatch.setattr("ditf_pipeline.view.app.serve", serve)
    return calls


def test_port_0_binds_a_free_port_and_prints_the_url_it_bound(demo, served):
    result = CliRunner().invoke(cli_app, ["view", "--store", str(demo["store"]), "--port", "0", "--no-uploads"])
    assert result.exit_code == 0, result.output
    port, token = served[0]["port"], served[0]["token"]
    assert port != 0 and f"http://127.0.0.1:{port}/?token={token}" in result.stdout


def test_a_taken_port_is_one_error_line_and_exit_1(demo, served):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["view", "--store", str(demo["store"]), "--port", str(port), "--no-uploads"])
    assert result.exit_code == 1 and served == []
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "in use" in lines[0]
    assert "http://" not in result.output


def test_store_dot_opens_the_current_folder(demo, served, monkeypatch):
    monkeypatch.chdir(demo["store"])
    result = CliRunner().invoke(cli_app, ["view", "--store", ".", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert served[0]["explorer"].uploads.folder == demo["store"].resolve().with_name("s.zarr.uploads")


def test_the_header_timeout_closes_a_connection_that_never_finishes_its_headers(demo):
    uvicorn = pytest.importorskip("uvicorn")
    from ditf_pipeline.view.server import bind, server_config

    app = create_app(Explorer(demo["store"], demo["root"], None, None))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, header_timeout=0.3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        with socket.create_connection(sock.getsockname()[:2], timeout=20) as slow:
            slow.sendall(b"GET /api/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            assert slow.recv(100) == b""  # closed by the server (a kept connection would block here)
        with socket.create_connection(sock.getsockname()[:2], timeout=20) as normal:
            normal.sendall(b"GET /api/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert normal.recv(12).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_redact_cuts_absolute_paths_and_keeps_urls():
    from ditf_pipeline.view.app import redact

    assert redact("store /home/me/stores/s.zarr: no key; (/root/.cache/x.bin)") == "store …/s.zarr: no key; (…/x.bin)"
    assert redact("store s3://bucket/x.zarr and ./rel/path") == "store s3://bucket/x.zarr and ./rel/path"


@pytest.mark.slow  # starts a moto S3 server
def test_an_object_store_url_is_opened_and_named_as_given(demo, served, s3):  # noqa: F811 - the fixture imported above
    url = s3
    missing = CliRunner().invoke(cli_app, ["view", "--store", f"{url}/absent.zarr", "--port", "0"])
    assert missing.exit_code == 1 and f"{url}/absent.zarr" in missing.output and "s3:/d" not in missing.output
    _build(f"{url}/v.zarr", demo["root"], demo["records"], seed=7)
    result = CliRunner().invoke(cli_app, ["view", "--store", f"{url}/v.zarr", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert f"store {url}/v.zarr" in result.output and "uploads are off" in result.output
    client = _client(served[0]["explorer"])
    assert [k["id"] for k in client.get("/api/keys").json()["keys"]] == ["spair/tiny-flux/k2/t260"]
