"""Published stores: `ditf pack`, then every reading command over a real HTTP server, and hf:// offline.

The server is the standard library's `http.server` on 127.0.0.1 (`_http_server.serve`): files
only, no directory listing, HTTP ranges answered. A store made by `ditf pack` is served and
read through its `http://` URL; each result must equal the same command on the local store.
hf:// cannot reach the Hub here (HF_HUB_OFFLINE=1): its URL parsing, the file system chosen and
the refusal of writes are tested; reading through the Hub is not.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.demo import make_spair_demo

from _http_server import serve
from _store_snapshot import without_store

KEY = "spair/tiny-flux/k1/t260"


def _cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def _refused(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, (args, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]  # (notes on stderr may come before it)
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny extract + match into a local store, packed into tmp/packed (served by each test)."""
    tmp = tmp_path_factory.mktemp("published")
    root = make_spair_demo(tmp / "SPair", categories=("cat",), pairs_per_category=2)
    common = ["--model", "tiny-flux", "--data-root", root, "--k", "1"]
    local = tmp / "local.zarr"
    _cli("extract", *common, "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "--no-progress",
         "--store", local)
    _cli("match", *common, "--variant", "adaln+cd", "--no-progress", "--store", local)
    [score] = json.loads(_cli("score", *common, "--store", local, "--format", "json"))
    result = CliRunner().invoke(app, ["pack", "--store", str(local), "--out", str(tmp / "packed")])
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "root": root, "common": common, "local": local, "packed": tmp / "packed",
            "score": score, "pack_output": result.output}


# ---- pack ------------------------------------------------------------------------------------------
def test_pack_writes_a_consolidated_store_a_manifest_and_a_card_listing_every_key(cache):
    packed = cache["packed"]
    assert "MB" in cache["pack_output"].split("\n")[0]  # sizes before copying
    meta = json.loads((packed / "ditf.zarr" / "zarr.json").read_text())
    nodes = meta["consolidated_metadata"]["metadata"]
    assert f"{KEY}/pre_adaln" in nodes and "spair/images/key" in nodes and not any(n.startswith("prompts") for n in nodes)
    manifest = json.loads((packed / "manifest.json").read_text())
    (key,) = [item for item in manifest["items"] if "config" in item]
    assert key["node"] == KEY and key["images"] == 3 and key["bytes"] > 0
    assert manifest["bytes"] == sum(item["bytes"] for item in manifest["items"])
    card = (packed / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "license: other" in header and "- ditf" in header
    assert f"### {KEY}" in card and json.dumps(key["config"], indent=2, sort_keys=True) in card
    assert "dataset spair" in card  # each source's licence is named
    assert "doctor: 0 problem(s)" in _cli("doctor", "--store", packed / "ditf.zarr")


def test_pack_without_predictions_and_into_a_non_empty_folder(cache, tmp_path):
    _cli("pack", "--store", cache["local"], "--out", tmp_path / "bare", "--no-predictions", "--model", "tiny-flux")
    nodes = json.loads((tmp_path / "bare" / "ditf.zarr" / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert f"{KEY}/pre_adaln" in nodes and not any("/predictions" in n for n in nodes)
    assert "exists and is not empty" in _refused("pack", "--store", cache["local"], "--out", tmp_path / "bare")
    assert "no feature key matching" in _refused("pack", "--store", cache["local"], "--out", tmp_path / "x", "--k", "9")


def test_pack_verifies_every_chunk_and_leaves_nothing_when_one_is_damaged(cache, tmp_path):
    source = tmp_path / "damaged.zarr"
    shutil.copytree(cache["local"], source)
    chunk = sorted((source / KEY / "pre_adaln" / "c").rglob("*"))
    chunk = [c for c in chunk if c.is_file()][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    line = _refused("pack", "--store", source, "--out", tmp_path / "out")
    assert "is damaged" in line and "image cat/" in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.ditf-pack-*"))


# ---- reading over HTTP -------------------------------------------------------------------------------
def test_opening_costs_one_metadata_read_and_features_equal_the_local_store(cache):
    from ditf_pipeline import open_store
    from ditf_pipeline.store.feature_store import FeatureStore

    with serve(cache["packed"]) as (base, requests):
        url = f"{base}/ditf.zarr"
        store = FeatureStore(url, read_only=True)
        assert requests == ["/ditf.zarr/zarr.json"] and store.feature_keys() == [("spair", "tiny-flux", 1, 260)]
        remote, local = open_store(url), open_store(cache["local"])
        for image in local.images("spair"):
            for variant in ("raw", "adaln+cd"):
                want = local.features("spair", "tiny-flux", variant=variant, image=image)
                got = remote.features("spair", "tiny-flux", variant=variant, image=image)
                assert np.array_equal(got.numpy(), want.numpy())
        assert not any(r.endswith("/") or r.endswith("zarr/spair") for r in requests)  # never a listing


def test_score_and_ablate_over_http_equal_the_local_store(cache, tmp_path):
    common = cache["common"]
    with serve(cache["packed"]) as (base, _):
        url = f"{base}/ditf.zarr"
        [scored] = json.loads(_cli("score", *common, "--store", url, "--format", "json"))
        assert without_store(scored) == without_store(cache["score"])
        preds = tmp_path / "preds.zarr"
        remote = _cli("ablate", *common, "--store", url, "--predictions-store", preds, "--no-progress",
                      "--format", "json", "-v", "raw", "-v", "adaln")
        [rescored] = json.loads(_cli("score", *common, "--store", url, "--predictions-store", preds, "--format", "json",
                                   "--variant", "raw"))
    copy = tmp_path / "local.zarr"  # the module's store stays as packed
    shutil.copytree(cache["local"], copy)
    local = _cli("ablate", *common, "--store", copy, "--no-progress", "--format", "json", "-v", "raw", "-v", "adaln")

    def table(output: str) -> list:
        return [without_store(r) for r in json.loads(output[output.index("["):])]

    assert table(remote) == table(local)
    assert rescored["variant"] == "raw" and without_store(rescored) == table(local)[0]
    checked = _cli("doctor", "--store", preds)  # a key holding only predictions is no half-done key
    assert "doctor: 0 problem(s)" in checked and f"{KEY}: predictions of the features in http://" in checked


def test_the_explorer_reads_a_published_store_as_the_local_one(cache):
    from ditf_pipeline.view.explorer import Explorer

    local = Explorer(cache["local"], cache["root"])
    with serve(cache["packed"]) as (base, _):
        remote = Explorer(f"{base}/ditf.zarr", cache["root"])
        (key,) = remote.all_keys()
        assert remote.describe_keys() == local.describe_keys()
        assert remote.pairs(key, "adaln+cd", "dift", 0.1) == local.pairs(key, "adaln+cd", "dift", 0.1)
        pair = local.pairs(key, "adaln+cd", "dift", 0.1)["pairs"][0]["pair_id"]
        got = remote.click(key, pair, ["raw", "adaln+cd"], "dift", keypoint=0)
        want = local.click(key, pair, ["raw", "adaln+cd"], "dift", keypoint=0)
        got.pop("ms"), want.pop("ms")  # how long it took
        assert json.dumps(got, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)


def test_a_damaged_chunk_on_the_server_is_one_line_naming_the_image(cache, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(cache["packed"], served)
    chunk = [c for c in sorted((served / "ditf.zarr" / KEY / "pre_adaln" / "c").rglob("*")) if c.is_file()][0]
    data = bytearray(chunk.read_bytes())
    chunk.write_bytes(bytes(data[: len(data) // 2]))  # truncated, as a cut transfer leaves it
    with serve(served) as (base, _):
        line = _refused("export", "--store", f"{base}/ditf.zarr", "--model", "tiny-flux", "--out", tmp_path / "exp",
                        "--file-format", "npy")
    assert "damaged" in line and "image cat/" in line, line


def test_writing_commands_refuse_a_published_store_naming_its_scheme(cache):
    common = cache["common"]
    with serve(cache["packed"]) as (base, requests):
        url = f"{base}/ditf.zarr"
        extract = _refused("extract", *common, "--img-size", "64", "--ensemble-size", "1", "--no-progress", "--store", url)
        assert "read-only (http:// serves reads only)" in extract
        assert "--predictions-store" in _refused("match", *common, "--no-progress", "--store", url)
        assert "read-only" in _refused("doctor", "--store", url, "--repair")
        checked = _cli("doctor", "--store", url)  # every chunk read over HTTP and checked
        assert "doctor: 0 problem(s)" in checked and f"{KEY}: 3/3 images complete and readable" in checked
        with pytest.raises(DitfError, match="read-only"):
            from ditf_pipeline.store.feature_store import FeatureStore

            FeatureStore(url)


def test_a_store_without_consolidated_metadata_and_a_missing_store_are_one_line_errors(cache, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(cache["packed"], served)
    meta = json.loads((served / "ditf.zarr" / "zarr.json").read_text())
    meta.pop("consolidated_metadata")
    (served / "ditf.zarr" / "zarr.json").write_text(json.dumps(meta))
    with serve(served) as (base, _):
        assert "no consolidated metadata" in _refused("score", *cache["common"], "--store", f"{base}/ditf.zarr")
        assert "does not exist" in _refused("score", *cache["common"], "--store", f"{base}/absent.zarr")


def test_a_server_ignoring_ranges_is_an_error_not_other_bytes(cache, monkeypatch):
    import _http_server

    from ditf_pipeline.store.feature_store import FeatureStore

    monkeypatch.setattr(_http_server, "RANGES", False)
    with serve(cache["packed"]) as (base, _):
        arrays = FeatureStore(f"{base}/ditf.zarr", read_only=True).open_features("spair", "tiny-flux", 1, 260)
        with pytest.raises(DitfError, match="asked for .* bytes"):
            arrays.read_image(0)


def test_a_local_read_cache_is_fsspecs_url_chaining(cache, tmp_path, monkeypatch):
    from ditf_pipeline import open_store

    import fsspec.config

    # what FSSPEC_SIMPLECACHE_CACHE_STORAGE sets when fsspec is imported (the CLI's case)
    monkeypatch.setitem(fsspec.config.conf, "simplecache", {"cache_storage": str(tmp_path / "cache")})
    with serve(cache["packed"]) as (base, _):
        got = open_store(f"simplecache::{base}/ditf.zarr").features("spair", "tiny-flux", image="cat/demo_0001")
    want = open_store(cache["local"]).features("spair", "tiny-flux", image="cat/demo_0001")
    assert np.array_equal(got.numpy(), want.numpy())
    assert any(path.is_file() for path in (tmp_path / "cache").rglob("*"))  # the chunks were kept locally


# ---- hf:// (offline: no Hub here) ------------------------------------------------------------------------
def test_hf_urls_are_parsed_into_hffilesystem_paths():
    from ditf_pipeline.store.feature_store import store_location

    assert store_location("hf://datasets/org/name/ditf.zarr") == "hf://datasets/org/name/ditf.zarr"
    assert store_location("hf://datasets/org/name/ditf.zarr@v1") == "hf://datasets/org/name@v1/ditf.zarr"
    assert store_location("hf://datasets/org/name@v1/ditf.zarr/") == "hf://datasets/org/name@v1/ditf.zarr"
    assert store_location("hf://datasets/org/name/ditf.zarr@refs/pr/1") == "hf://datasets/org/name@refs%2Fpr%2F1/ditf.zarr"
    assert store_location("https://host/x/ditf.zarr/") == "https://host/x/ditf.zarr"
    assert store_location("filecache::hf://datasets/org/name/ditf.zarr") == "filecache::hf://datasets/org/name/ditf.zarr"
    for bad in ("hf://org/name", "hf://datasets/org", "https://", "memory::https://h/x", "simplecache::s3://b/x"):
        with pytest.raises(DitfError):
            store_location(bad)


def test_hf_is_read_through_hffilesystem_and_writes_are_refused_without_the_network(cache):
    from huggingface_hub import HfFileSystem

    from ditf_pipeline.store.backends import backend_for, store_location
    from ditf_pipeline.store.feature_store import FeatureStore

    url = "hf://datasets/org/name/ditf.zarr@v1"
    backend = backend_for(store_location(url))
    assert isinstance(backend.fs, HfFileSystem) and backend.root == "datasets/org/name@v1/ditf.zarr"
    with pytest.raises(DitfError, match=r"read-only \(hf:// serves reads only\)"):
        FeatureStore(url)
    line = _refused("extract", *cache["common"], "--img-size", "64", "--no-progress", "--store", url)
    assert "hf://" in line and "read-only" in line


def test_compare_analyze_and_show_read_a_published_store(cache, tmp_path):
    from ditf_pipeline.view.explorer import Explorer

    root = cache["root"]
    (key,) = Explorer(cache["local"], root).all_keys()
    pair = Explorer(cache["local"], root).pairs(key, "adaln+cd", "dift", 0.1)["pairs"][0]["pair_id"]
    copy = tmp_path / "local.zarr"
    shutil.copytree(cache["local"], copy)
    local = _cli("compare", "--data-root", root, "--store", copy, "--no-progress", "--format", "json")
    with serve(cache["packed"]) as (base, _):
        url = f"{base}/ditf.zarr"
        remote = _cli("compare", "--data-root", root, "--store", url, "--predictions-store", tmp_path / "p.zarr",
                      "--no-progress", "--format", "json")
        analyzed = _cli("analyze", "--data-root", root, "--store", url, "--model", "tiny-flux", "--no-plots",
                        "--out", tmp_path / "an")
        assert "read-only" in _refused("analyze", "--data-root", root, "--store", url, "--model", "tiny-flux",
                                       "--no-plots", "--write", "--out", tmp_path / "an2")
        _cli("show", "--data-root", root, "--store", url, "--model", "tiny-flux", "--pair", pair,
             "--out", tmp_path / "pair.png")

    def table(output: str) -> list:
        return [without_store(r) for r in json.loads(output[output.index("["):])]

    assert table(remote) == table(local)
    assert "massive channels" in analyzed and (tmp_path / "pair.png").stat().st_size > 0


def test_a_failing_server_is_retried_then_one_error_line(cache, monkeypatch):
    import _http_server

    from ditf_pipeline import open_store

    want = open_store(cache["local"]).features("spair", "tiny-flux", image="cat/demo_0000")
    monkeypatch.setenv("DITF_REMOTE_RETRIES", "2")
    monkeypatch.setattr(_http_server, "FAILURES", [0])  # (restored after the test)
    with serve(cache["packed"]) as (base, _):
        _http_server.FAILURES[0] = 2  # two 503s: the retries get through
        got = open_store(f"{base}/ditf.zarr").features("spair", "tiny-flux", image="cat/demo_0000")
        assert np.array_equal(got.numpy(), want.numpy()) and _http_server.FAILURES[0] == 0
        _http_server.FAILURES[0] = 1000  # down for good
        line = _refused("export", "--store", f"{base}/ditf.zarr", "--model", "tiny-flux", "--out", cache["tmp"] / "x",
                        "--file-format", "npy")
    assert "after 3 tries" in line and "503" in line, line


def test_a_stalled_server_times_out_into_one_error_line(cache, monkeypatch, tmp_path):
    import _http_server

    monkeypatch.setenv("DITF_REMOTE_TIMEOUT", "0.5")
    monkeypatch.setenv("DITF_REMOTE_RETRIES", "1")
    monkeypatch.setattr(_http_server, "DELAY", [3.0])
    with serve(cache["packed"]) as (base, _):
        line = _refused("export", "--store", f"{base}/ditf.zarr", "--model", "tiny-flux", "--out", tmp_path / "x",
                        "--file-format", "npy")
    assert "after 2 tries" in line and "Timeout" in line, line


def test_the_card_names_each_sources_licence_and_agrees_only_when_they_do():
    from ditf_pipeline.store.card import card

    def key(node):
        return {"node": node, "images": 1, "bytes": 10, "config": {"model": node.split("/")[1]}, "predictions": []}

    text = card([key("spair/flux/k28/t260"), key("spair/dinov2-b14/k11/t0")], version="9.9", total_bytes=20)
    assert text.startswith("---\nlicense: other\n") and "ditf 9.9" in text
    assert "| model flux | FLUX.1 [dev] Non-Commercial License" in text and "| model dinov2-b14 | Apache 2.0" in text
    assert "| dataset spair | unknown" in text
    assert "### spair/flux/k28/t260" in text and "### spair/dinov2-b14/k11/t0" in text
    assert card([key("spair/flux/k28/t260")], version="1", total_bytes=1, license="cc-by-nc-4.0").startswith(
        "---\nlicense: cc-by-nc-4.0\n")
