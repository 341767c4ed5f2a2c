"""Stores in object storage (`--store s3://bucket/prefix`), against a real S3-compatible server.

The server is moto's standalone server (`ThreadedMotoServer`), started by this module on
127.0.0.1: ditf talks HTTP to it through s3fs and zarr's FsspecStore exactly as to AWS; the
client library is not mocked. Under `CI=true` a server that cannot start fails the module
instead of skipping it.
"""

from __future__ import annotations

import json
import socket
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError

from _store_snapshot import differences, snapshot, without_store

BUCKET = "ditf-test"
KEY = "spair/tiny-flux/k1/t260"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs at it."""
    saved = dict(os.environ)
    try:
        from moto.server import ThreadedMotoServer

        with socket.socket() as probe:  # a free port on loopback (older moto cannot report one it picked)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        host = "127.0.0.1"
        server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        server.start()
    except Exception as exc:  # pragma: no cover - only without moto[server]
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot start the S3 test server (moto[server] is in the dev extra): {exc}")
        pytest.skip(f"no S3 test server: {exc}")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import urllib.request

    import s3fs

    # fsspec hands back filesystems made earlier in this process: one of them talks to the
    # server of a module that ran before
    s3fs.S3FileSystem.clear_instance_cache()
    # moto keeps its buckets in process-wide state that every server of this process shares: a
    # module that ran before left its bucket and objects there, so start each module from nothing
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


# ---- fast: parsing and local files of remote stores ------------------------------------------------
def test_store_urls_are_parsed_once():
    from ditf_pipeline.store.feature_store import local_beside, store_location

    assert store_location("stores/a.zarr") == Path("stores/a.zarr")
    assert store_location("file:///tmp/a.zarr") == Path("/tmp/a.zarr")
    assert store_location("s3://b/run/a.zarr/") == "s3://b/run/a.zarr"
    assert local_beside("s3://b/run/a.zarr", ".results") == Path("stores/s3_b_run_a.zarr.results")
    with pytest.raises(DitfError, match="unknown URL scheme ftp"):
        store_location("ftp://host/a.zarr")
    with pytest.raises(DitfError, match="name a bucket"):
        store_location("s3://")


def test_a_file_url_is_the_local_store(tmp_path):
    from ditf_pipeline.store.feature_store import FeatureStore

    store = FeatureStore(f"file://{tmp_path}/a.zarr")
    assert store.path == tmp_path / "a.zarr" and (tmp_path / "a.zarr" / "zarr.json").is_file() and not store.remote


def test_an_unknown_bucket_and_a_missing_store_are_one_line_errors(s3):
    result = CliRunner().invoke(app, ["doctor", "--store", "s3://no-such-bucket/x.zarr"])
    assert result.exit_code == 1 and "no-such-bucket/x.zarr does not exist" in result.output, result.output
    result = CliRunner().invoke(app, ["doctor", "--store", f"{s3}/absent.zarr", "--repair"])
    assert result.exit_code == 1 and "absent.zarr does not exist" in result.output, result.output
    result = CliRunner().invoke(app, ["extract", "--store", "s3://no-such-bucket/x.zarr", "--data-root", "nowhere"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    from ditf_pipeline.store.feature_store import FeatureStore

    with pytest.raises(DitfError, match="does not exist"):
        FeatureStore(f"{s3}/absent.zarr", read_only=True)
    with pytest.raises(DitfError, match="bucket no-such-bucket does not exist"):
        FeatureStore("s3://no-such-bucket/x.zarr")
    assert not _fs().exists(f"{BUCKET}/absent.zarr")  # nothing was created by the failed opens


@pytest.mark.slow
def test_an_unreachable_endpoint_is_named_as_such(monkeypatch):
    """Not "the bucket does not exist": nothing answers at the configured endpoint."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for key, value in dict(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["doctor", "--store", "s3://bucket/x.zarr"])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the object store at http://127.0.0.1:{port}" in result.output, result.output
    assert "does not exist" not in result.output
    from ditf_pipeline.store.feature_store import FeatureStore

    with pytest.raises(DitfError, match=f"cannot reach the object store at http://127.0.0.1:{port}"):
        FeatureStore("s3://bucket/x.zarr")  # what extract and match open


def test_view_prints_an_object_store_url_as_given(s3, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    result = CliRunner().invoke(app, ["view", "--store", f"{s3}/absent.zarr", "--no-uploads"])
    assert result.exit_code == 1 and f"store {s3}/absent.zarr does not exist" in result.output, result.output
    monkeypatch.chdir(tmp_path)  # `--store .`: an empty folder, not a store; one line, no traceback
    result = CliRunner().invoke(app, ["view", "--store", "."])
    assert result.exit_code == 1 and result.output.startswith("error: "), (result.output, result.exception)


# ---- leases ---------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from ditf_pipeline.store.feature_store import FeatureStore
    with FeatureStore(sys.argv[1]).writer_lock("spair", "tiny-flux", 1, 260):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lease until the test closes our stdin (or kills us)
""")
LEASE = ".ditf/locks/spair%tiny-flux%k1%t260.lease"


def _holder(url: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_holds_the_lease(s3, tmp_path):
    from ditf_pipeline.store.feature_store import FeatureStore

    url = f"{s3}/lease.zarr"
    holder = _holder(url)
    try:
        lease = json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}"))
        assert lease["pid"] == holder.pid and lease["expires"] > time.time()
        root = make_spair_demo(tmp_path / "SPair", categories=("cat",), pairs_per_category=1)
        result = CliRunner().invoke(app, ["extract", "--model", "tiny-flux", "--data-root", str(root), "--k", "1",
                                          "--img-size", "64", "--ensemble-size", "1", "--no-progress", "--store", url])
        assert result.exit_code == 1
        assert "error: another process is extracting spair/tiny-flux/k1/t260 into s3://" in result.output
        with FeatureStore(url).writer_lock("spair", "tiny-flux", 1, 90):  # another key is free
            pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not _fs().exists(f"{url[5:]}/{LEASE}")  # released: the lease object is gone
    with FeatureStore(url).writer_lock("spair", "tiny-flux", 1, 260):
        pass


def test_a_lease_left_by_a_killed_writer_does_not_strand_the_key(s3):
    from ditf_pipeline.store.feature_store import FeatureStore

    url = f"{s3}/killed-holder.zarr"
    holder = _holder(url)
    holder.kill()
    holder.wait(timeout=60)
    assert _fs().exists(f"{url[5:]}/{LEASE}")  # left behind by the SIGKILL
    with FeatureStore(url).writer_lock("spair", "tiny-flux", 1, 260):  # its process is dead: taken over at once
        assert json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}"))["pid"] == os.getpid()


@pytest.mark.parametrize("expired", [True, False])
def test_a_lease_of_another_host_is_taken_over_only_once_expired(s3, expired):
    from ditf_pipeline.store.feature_store import FeatureStore

    url = f"{s3}/other-host-{expired}.zarr"
    store = FeatureStore(url)
    other = {"owner": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "expires": time.time() + (-5 if expired else 300)}
    _fs().pipe_file(f"{url[5:]}/{LEASE}", json.dumps(other).encode())
    if expired:
        with store.writer_lock("spair", "tiny-flux", 1, 260):
            assert json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}"))["host"] != "elsewhere"
    else:
        with pytest.raises(DitfError, match="another process is extracting"):
            with store.writer_lock("spair", "tiny-flux", 1, 260):
                pass
        assert json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}")) == other  # a live lease is left alone


def test_the_holder_renews_its_lease(s3, monkeypatch):
    from ditf_pipeline.store import leases
    from ditf_pipeline.store.feature_store import FeatureStore

    monkeypatch.setattr(leases, "LEASE_SECONDS", 0.6)
    url = f"{s3}/renew.zarr"
    store = FeatureStore(url)
    with store.writer_lock("spair", "tiny-flux", 1, 260):
        first = json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}"))["expires"]
        time.sleep(1.5)  # well past the first expiry: the heartbeat must have pushed it forward
        assert json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}"))["expires"] > first


def test_a_writer_whose_lease_was_taken_over_stops_before_its_next_write(s3, monkeypatch):
    from ditf_pipeline.store import leases
    from ditf_pipeline.store.feature_store import FeatureStore

    monkeypatch.setattr(leases, "LEASE_SECONDS", 0.6)
    url = f"{s3}/taken.zarr"
    store = FeatureStore(url)
    with store.writer_lock("spair", "tiny-flux", 1, 260):
        other = {"owner": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "expires": time.time() + 300}
        _fs().pipe_file(f"{url[5:]}/{LEASE}", json.dumps(other).encode())  # what a takeover leaves
        time.sleep(1.0)  # several heartbeats: the holder reads the lease and finds another owner
        with pytest.raises(DitfError, match="lost the lease .*another writer took it over"):
            store.root.require_group("after")
    assert not _fs().exists(f"{url[5:]}/after")  # nothing was written
    assert json.loads(_fs().cat_file(f"{url[5:]}/{LEASE}")) == other  # and the new holder's lease is left alone


def test_a_writer_stalled_past_its_lease_stops_before_its_next_write(s3, monkeypatch):
    """A stalled process (its heartbeat stalled with it) learns from its own clock, before writing."""
    from ditf_pipeline.store import leases
    from ditf_pipeline.store.feature_store import FeatureStore

    monkeypatch.setattr(leases, "LEASE_SECONDS", 0.5)
    monkeypatch.setattr(leases.ObjectLease, "_heartbeat", lambda self, stop: None)  # renews nothing
    url = f"{s3}/stalled.zarr"
    store = FeatureStore(url)
    with store.writer_lock("spair", "tiny-flux", 1, 260):
        time.sleep(0.6)  # past the lease: another writer may have taken it over
        with pytest.raises(DitfError, match="lost the lease .*not renewed"):
            store.register_images("spair", ["a"], [(4, 4)])
    assert not _fs().exists(f"{url[5:]}/spair")


# ---- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """extract -> match -> score of the same tiny run into a local path and into s3://."""
    from ditf_pipeline.store import faults

    tmp = tmp_path_factory.mktemp("objstore")
    root = make_spair_demo(tmp / "SPair", categories=("cat",), pairs_per_category=2)
    common = ["--model", "tiny-flux", "--data-root", root, "--k", "1"]
    extract = ["extract", *common, "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "--no-progress"]
    match = ["match", *common, "--variant", "adaln+cd", "--no-progress"]
    out = {}
    for name, store in (("local", tmp / "local.zarr"), ("s3", f"{s3}/run/ditf.zarr")):
        counter = faults.arm(trace=True)
        _cli(*extract, "--store", store)
        trace = counter.trace
        faults.disarm()
        extracted = snapshot(store)  # as extract leaves it (match adds predictions and the detected channels)
        _cli(*match, "--store", store)
        score = tmp / f"{name}.json"
        _cli("score", *common, "--store", store, "--format", "json", "--out", score)
        out[name] = {"store": store, "snapshot": snapshot(store), "extracted": extracted,
                     "score": json.loads(score.read_text())[0], "trace": trace}
    return {"tmp": tmp, "root": root, "extract": extract, "match": match, "common": common, **out}


@pytest.mark.slow
def test_extract_match_score_into_s3_equals_the_local_run(runs):
    assert differences(runs["s3"]["snapshot"], runs["local"]["snapshot"]) == []
    assert without_store(runs["s3"]["score"]) == without_store(runs["local"]["score"])
    objects = _fs().find(f"{BUCKET}/run/ditf.zarr")
    assert any(f"{KEY}/pre_adaln/c/" in o for o in objects)
    assert not [o for o in objects if "/.ditf/staging/" in o or o.endswith(".lease")]  # nothing left behind


def _killed_extract(runs, store: str, kill_at: int) -> None:
    """`ditf extract` in a subprocess that SIGKILLs itself right before its `kill_at`-th store write."""
    marker = runs["tmp"] / f"killed-{kill_at}"
    env = {**os.environ, "DITF_KILL_AT_WRITE": str(kill_at), "DITF_KILL_MARKER": str(marker)}
    proc = subprocess.run([sys.executable, "-m", "ditf_cli.main", *map(str, runs["extract"]), "--store", store],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert marker.read_text() == str(kill_at)  # it was alive, right before that write


@pytest.mark.slow
def test_a_killed_extract_resumes_to_the_same_store_and_doctor_finds_and_repairs_the_half_done_setup(runs, s3):
    trace = runs["s3"]["trace"]
    # a kill half way through copying the feature key into place: a node without its zarr.json
    copies = [i for i, what in enumerate(trace, 1) if what.startswith("copy ") and f"{KEY}/" in what.split(" -> ")[1]]
    assert len(copies) > 3
    store = f"{s3}/killed.zarr"
    _killed_extract(runs, store, copies[len(copies) // 2])
    _fs().copy(f"{BUCKET}/killed.zarr", f"{BUCKET}/killed-copy.zarr", recursive=True)
    sick = CliRunner().invoke(app, ["doctor", "--store", store])
    assert sick.exit_code == 1
    assert f"{KEY}: half-done setup of a feature key" in sick.output and "note: store: unfinished setup of a" in sick.output
    _cli(*runs["extract"], "--store", store)  # a plain rerun clears the half-copied node and publishes it anew
    want = runs["s3"]["extracted"]
    assert differences(snapshot(store), want) == []

    copy = f"{s3}/killed-copy.zarr"  # the same interrupted state, repaired by the doctor instead
    repaired = CliRunner().invoke(app, ["doctor", "--store", copy, "--repair"])
    assert f"removed {KEY}" in repaired.output, repaired.output
    # the killed writer's staging (a dead process of this host) went as the repairing writer opened the store
    assert not _fs().exists(f"{BUCKET}/killed-copy.zarr/.ditf/staging") or not _fs().ls(
        f"{BUCKET}/killed-copy.zarr/.ditf/staging")
    assert CliRunner().invoke(app, ["doctor", "--store", copy]).exit_code == 0
    assert not _fs().exists(f"{BUCKET}/killed-copy.zarr/{KEY}")

    # a kill among the per-image writes, resumed by a plain rerun (no doctor)
    data = [i for i, what in enumerate(trace, 1) if f"{KEY}/pre_adaln/c/" in what]
    store = f"{s3}/killed-data.zarr"
    _killed_extract(runs, store, data[-1])
    _cli(*runs["extract"], "--store", store)
    assert differences(snapshot(store), want) == []


@pytest.mark.slow
def test_doctor_finds_a_damaged_chunk_in_s3_and_repair_uncommits_it(runs, s3):
    fs = _fs()
    source, store = f"{BUCKET}/run/ditf.zarr", f"{s3}/damaged.zarr"
    fs.copy(source, f"{BUCKET}/damaged.zarr", recursive=True)
    chunk = sorted(o for o in fs.find(f"{BUCKET}/damaged.zarr/{KEY}/pre_adaln/c"))[0]
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    sick = CliRunner().invoke(app, ["doctor", "--store", store])
    assert sick.exit_code == 1 and "is unreadable" in sick.output, sick.output
    repaired = CliRunner().invoke(app, ["doctor", "--store", store, "--repair"])
    assert "cleared the complete flag" in repaired.output, repaired.output
    _cli(*runs["extract"], "--store", store)
    assert differences(snapshot(store), runs["s3"]["snapshot"]) == []
