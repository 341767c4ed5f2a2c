"""Writers of an object store kept apart as on a local one: leases for runs, conditional writes
for the image index. Against moto's S3 server (the `s3` fixture of test_object_store)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import zarr

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.store.feature_store import FeatureStore

from test_object_store import _fs, s3  # noqa: F401 - the module's S3 server, as a fixture here
from test_store_locks import _extract_lock, shard_and_whole_runs_exclude_each_other

LOCKS = ".ditf/locks/spair%tiny-flux%k1%t260"


def _plant_lease(url: str, suffix: str, expires_in: float) -> None:
    """A lease of another host's writer, live or expired (`expires_in` < 0)."""
    lease = {"owner": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "expires": time.time() + expires_in}
    _fs().pipe_file(f"{url[5:]}/{LOCKS}{suffix}.lease", json.dumps(lease).encode())


# ---- runs of one key: shard jobs and whole-key runs (mirrors test_store_locks) -------------------------
def test_shard_jobs_and_a_whole_key_run_exclude_each_other_on_an_object_store(s3):  # noqa: F811
    shard_and_whole_runs_exclude_each_other(FeatureStore(f"{s3}/runs.zarr"))


@pytest.mark.parametrize("suffix, run", [("%whole", "0/2"), ("%shard-1-of-3", None), ("%shard-1-of-3", "0/2")])
def test_an_expired_lease_of_another_run_does_not_keep_a_run_out(s3, suffix, run):  # noqa: F811
    url = f"{s3}/stale{suffix.replace('%', '-')}-{run is None}.zarr"
    store = FeatureStore(url)
    _plant_lease(url, suffix, expires_in=300)
    with pytest.raises(DitfError, match="another process|shard jobs|shards of another count"):
        _extract_lock(store, run)  # live: refused
    _plant_lease(url, suffix, expires_in=-5)
    _extract_lock(store, run)  # its holder stopped renewing it long ago: not a running writer


# ---- the image index: registration is a compare-and-swap ---------------------------------------------
def _without_leases(monkeypatch):
    """Writers that hold no index lease: what two writers that both took over one stale lease (or
    one stalled past its lease) are. Only the conditional writes keep them apart then."""
    monkeypatch.setattr(FeatureStore, "lock", lambda self, node, refusal, wait=0.0: contextlib.nullcontext())


def _indexed(url: str) -> dict[str, int]:
    return FeatureStore(url, read_only=True).image_rows("spair")


def test_a_write_over_a_version_changed_since_it_was_listed_is_refused_by_the_server(s3):  # noqa: F811
    from ditf_pipeline.store.backends.conditional import Conflict

    url = f"{s3}/stale-etag.zarr"
    store = FeatureStore(url)
    store.register_images("spair", ["a"], [(4, 4)])
    meta = f"{url[5:]}/spair/images/zarr.json"
    stale = _fs().info(meta)["ETag"]
    conditional = store.backend.conditional_store("spair/images")  # lists the versions now
    _fs().pipe_file(meta, _fs().cat_file(meta).replace(b'"count": 1', b'"count": 1 '))  # another writer's put
    with pytest.raises(OSError, match="pre-condition"):  # the server itself checks If-Match
        _fs().pipe_file(meta, b"{}", IfMatch=stale)
    group = zarr.open_group(store=conditional, mode="r+", use_consolidated=False)
    with pytest.raises(Conflict):
        group.attrs["count"] = 5
    assert json.loads(_fs().cat_file(meta))["attributes"]["count"] == 1  # the other writer's version stands
    assert _indexed(url) == {"a": 0}


def test_a_registration_overtaken_by_another_starts_over_and_both_are_indexed(s3, monkeypatch):  # noqa: F811
    """Writer A claims the index and stalls before its rows; writer B registers meanwhile. A's next
    write is refused (B changed what A listed), A starts over from B's index: nobody's rows vanish."""
    from ditf_pipeline.store import image_index

    _without_leases(monkeypatch)
    url = f"{s3}/overtaken.zarr"
    FeatureStore(url).register_images("spair", ["first"], [(4, 4)])
    a_keys, b_keys = [f"a{i}" for i in range(20)], [f"b{i}" for i in range(20)]
    a_claimed, b_done, appends = threading.Event(), threading.Event(), []
    append = image_index.append_rows

    def stalling_append(index, start, new):
        appends.append(new[0][0])
        if new[0][0] == "a0" and not a_claimed.is_set():
            a_claimed.set()
            assert b_done.wait(60)  # A stalls here, its claim written, until B has committed
        append(index, start, new)

    monkeypatch.setattr(image_index, "append_rows", stalling_append)
    results = {}

    def register(name, keys):
        results[name] = FeatureStore(url).register_images("spair", keys, [(4, 4)] * len(keys))

    a = threading.Thread(target=register, args=("a", a_keys))
    a.start()
    assert a_claimed.wait(60)
    register("b", b_keys)
    b_done.set()
    a.join(60)
    assert appends.count("a0") == 2  # A's first try was refused, its second one committed
    index = _indexed(url)
    assert sorted(index) == sorted(["first", *a_keys, *b_keys])
    assert sorted(index.values()) == list(range(41))
    assert {k: index[k] for k in b_keys} == {k: results["b"][k] for k in b_keys}  # B's rows kept
    assert {k: index[k] for k in a_keys} == {k: results["a"][k] for k in a_keys}
    assert min(results["a"][k] for k in a_keys) == 21  # A's rows follow B's


def _atomic_conditional_puts(monkeypatch):
    """S3 checks a put's condition and stores the object as one step; moto's threaded server
    checks, then stores, in the request's thread. One lock around both makes it S3 here (the
    server runs in this process), so that a test of racing writers tests ditf, not moto."""
    from moto.s3.responses import S3Response

    guard = threading.Lock()
    for name in ("put_object", "delete_object"):
        plain = getattr(S3Response, name)

        def atomic(self, plain=plain):
            with guard:
                return plain(self)

        monkeypatch.setattr(S3Response, name, atomic)


def test_writers_registering_at_once_all_end_up_in_the_index(s3, monkeypatch):  # noqa: F811
    _without_leases(monkeypatch)
    _atomic_conditional_puts(monkeypatch)
    url = f"{s3}/at-once.zarr"
    FeatureStore(url).register_images("spair", ["first"], [(4, 4)])
    start, results = threading.Barrier(3), {}

    def register(name):
        keys = [f"{name}{i}" for i in range(15)]
        store = FeatureStore(url)  # each writer its own store and backend, as two processes
        start.wait()
        results[name] = store.register_images("spair", keys, [(4, 4)] * len(keys))

    threads = [threading.Thread(target=register, args=(name,)) for name in "xyz"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    index = _indexed(url)
    assert len(index) == 46 and sorted(index.values()) == list(range(46))
    for name, rows in results.items():
        assert all(index[key] == row for key, row in rows.items() if key.startswith(name))


def test_a_registration_that_keeps_being_overtaken_stops_with_one_error_and_writes_nothing(s3, monkeypatch):  # noqa: F811
    from ditf_pipeline.store import image_index

    _without_leases(monkeypatch)
    url = f"{s3}/always-overtaken.zarr"
    FeatureStore(url).register_images("spair", ["first"], [(4, 4)])
    meta = f"{url[5:]}/spair/images/zarr.json"
    append, tries = image_index.append_rows, []

    def overtaken_append(index, start, new):
        tries.append(start)
        _fs().pipe_file(meta, _fs().cat_file(meta) + b" ")  # another writer's claim (a new version)
        append(index, start, new)

    monkeypatch.setattr(image_index, "append_rows", overtaken_append)
    with pytest.raises(DitfError, match="the image index of spair in s3://.* kept changing under this writer"):
        FeatureStore(url).register_images("spair", ["late"], [(4, 4)])
    assert len(tries) == image_index.INDEX_TRIES
    assert _indexed(url) == {"first": 0}


# ---- taking over a stale lease, and renewing one, are compare-and-swap on S3 ---------------------------
def _lease(url: str, name: str = "index"):
    from ditf_pipeline.store.leases import ObjectLease

    backend = FeatureStore(url).backend  # each lease its own backend and file system, as two processes
    return ObjectLease(fs=backend.fs, key=backend.key(f"{LOCKS}{name}.lease"), name=f"{url}#{name}-{id(backend)}",
                       call=backend.call, refusal="held by another run", wait=0.0)


def test_two_writers_that_found_one_stale_lease_cannot_both_take_it_over(s3, monkeypatch):  # noqa: F811
    """The first reads the stale lease; the second reads it too and takes it over; then the first
    writes its takeover, of the version both read: the server refuses it."""
    from ditf_pipeline.store.leases import ObjectLease

    url = f"{s3}/takeover-race.zarr"
    FeatureStore(url)
    _plant_lease(url, "index", expires_in=-5)
    first, second = _lease(url), _lease(url)
    read, second_took = ObjectLease._read_versioned, []

    def read_then_let_the_second_in(self):
        found = read(self)
        if self is first and not second_took:
            assert found is not None and found[1]["owner"] == "elsewhere:1:x"  # the stale lease, read
            second_took.append(second._try())  # reads the same stale lease, takes it over
        return found

    monkeypatch.setattr(ObjectLease, "_read_versioned", read_then_let_the_second_in)
    with pytest.raises(DitfError, match="^held by another run$"):
        with first.held():
            pass
    assert second_took == [True]
    assert json.loads(_fs().cat_file(second.key))["owner"] == second.owner  # the second holds it, alone
    second._release()
    assert not _fs().exists(second.key)


def test_a_holder_whose_lease_was_taken_over_learns_it_at_its_next_renewal(s3, monkeypatch):  # noqa: F811
    from ditf_pipeline.store import leases

    url = f"{s3}/renewal-after-takeover.zarr"
    FeatureStore(url)
    first, second = _lease(url), _lease(url)
    with first.held():
        assert first._renew()  # renewed while it holds
        # the first holder stalls past its lease: the second finds it stale and takes it over
        monkeypatch.setattr(leases.ObjectLease, "_stale", staticmethod(lambda lease: True))
        with second.held():
            assert not first._renew()  # what its heartbeat does next: refused (If-Match its own last write)
            assert first.lost
            with pytest.raises(DitfError, match=r"lost the lease .* \(another writer took it over\): stopped before writing more"):
                leases.check_held()
            assert json.loads(_fs().cat_file(second.key))["owner"] == second.owner  # not overwritten by the renewal
    assert not _fs().exists(second.key)  # the first did not remove the second's lease on leaving


# ---- a registration's claim left by a killed writer -----------------------------------------------------
class _Killed(BaseException):
    """What a SIGKILL is to the code after it: nothing below runs (no except, no retry)."""


def _killed_after_the_claim(url: str, monkeypatch) -> None:
    """A registration killed right after it claimed the index (the claim written by the same code)."""
    from ditf_pipeline.store import image_index

    def killed(index, start, new):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(image_index, "append_rows", killed)
        with pytest.raises(_Killed):
            FeatureStore(url).register_images("spair", ["killed"], [(4, 4)])


@pytest.mark.parametrize("keys", [["first"], ["second"], None], ids=["no-new-image", "a-new-image", "doctor-repair"])
def test_a_claim_left_by_a_killed_registration_is_a_doctor_note_and_the_next_registration_clears_it(s3, monkeypatch, keys):  # noqa: F811
    from typer.testing import CliRunner

    from ditf_cli.main import app

    url = f"{s3}/killed-claim-{keys[0] if keys else 'repair'}.zarr"
    FeatureStore(url).register_images("spair", ["first"], [(4, 4)])
    _killed_after_the_claim(url, monkeypatch)
    mark = FeatureStore(url, read_only=True).registration_mark("spair")
    assert mark is not None and mark["pid"] == __import__("os").getpid()
    assert _indexed(url) == {"first": 0}  # the killed registration's row was never committed
    doctor = CliRunner().invoke(app, ["doctor", "--store", url])
    assert doctor.exit_code == 0, doctor.output  # harmless: readers go by the committed count
    assert "note: store: spair/images: an image registration's claim by " in doctor.output
    assert "was never committed" in doctor.output and "doctor: 0 problem(s)" in doctor.output
    if keys is None:
        repaired = CliRunner().invoke(app, ["doctor", "--store", url, "--repair"])
        assert repaired.exit_code == 0 and "cleared the registration claim of spair/images" in repaired.output
    else:
        FeatureStore(url).register_images("spair", keys, [(4, 4)])  # what the next extract does first
    assert FeatureStore(url, read_only=True).registration_mark("spair") is None
    assert "registration's claim" not in CliRunner().invoke(app, ["doctor", "--store", url]).output
    assert _indexed(url) == ({"first": 0, "second": 1} if keys == ["second"] else {"first": 0})
