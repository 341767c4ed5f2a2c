"""Writer locks: lock files under `.ditf/locks`, POSIX `lockf` on a read-write descriptor."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from ditf_pipeline.store import locks
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.store.feature_store import FeatureStore

HOLDER = textwrap.dedent("""
    import sys
    from ditf_pipeline.store.feature_store import FeatureStore
    with FeatureStore(sys.argv[1]).writer_lock("spair", "tiny-flux", 1, 260):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the test closes our stdin
""")


def test_a_second_writer_in_another_process_is_refused_until_the_first_exits(tmp_path):
    path = tmp_path / "s.zarr"
    FeatureStore(path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DitfError, match="another process is extracting spair/tiny-flux/k1/t260"):
            with FeatureStore(path).writer_lock("spair", "tiny-flux", 1, 260):
                pass
        with FeatureStore(path).writer_lock("spair", "tiny-flux", 1, 90):  # another key is free
            pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with FeatureStore(path).writer_lock("spair", "tiny-flux", 1, 260):  # released when its holder ended
        pass
    assert (path / ".ditf" / "locks" / "spair%tiny-flux%k1%t260.lock").is_file()


def test_the_same_lock_twice_in_one_process_is_refused_too(tmp_path):
    """POSIX locks belong to the process: ditf refuses the second taker itself."""
    store = FeatureStore(tmp_path / "s.zarr")
    with store.writer_lock("spair", "tiny-flux", 1, 260):
        with pytest.raises(DitfError, match="another process is extracting"):
            with store.writer_lock("spair", "tiny-flux", 1, 260):
                pass
    with store.writer_lock("spair", "tiny-flux", 1, 260):
        pass


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_one_clear_error(tmp_path, monkeypatch, code):
    store = FeatureStore(tmp_path / "s.zarr")

    def no_locks(fd, operation):
        raise OSError(code, "locking not supported")

    monkeypatch.setattr(locks.fcntl, "lockf", no_locks)
    with pytest.raises(DitfError, match="cannot lock files .*POSIX locks"):
        with store.writer_lock("spair", "tiny-flux", 1, 260):
            pass


def test_registering_images_waits_for_a_concurrent_registration_instead_of_failing(tmp_path):
    """Shards started together all append to one image index: the later ones queue for it."""
    path = tmp_path / "s.zarr"
    FeatureStore(path).register_images("spair", ["a"], [(4, 3)])
    holder_script = textwrap.dedent("""
        import sys, time
        from ditf_pipeline.store.feature_store import FeatureStore
        with FeatureStore(sys.argv[1]).lock("spair/images", "held"):
            print("locked", flush=True)
            time.sleep(1.5)
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert holder.poll() is None  # the index is really held while we register
        rows = FeatureStore(path).register_images("spair", ["b", "a"], [(5, 5), (4, 3)])
    finally:
        holder.wait(timeout=60)
    assert rows == {"a": 0, "b": 1}


# ---- runs of one node: whole runs, shard jobs, shards of another count, predictions groups -----------
RUN_HOLDER = textwrap.dedent("""
    import sys
    from ditf_pipeline.store.feature_store import FeatureStore
    store, what, shard = FeatureStore(sys.argv[1]), sys.argv[2], sys.argv[3] or None
    lock = (store.writer_lock("spair", "tiny-flux", 1, 260, shard=shard) if what == "extract" else
            store.predictions_lock(("spair", "tiny-flux", 1, 260), "adaln+cd/nn", "test-12345678", shard=shard))
    with lock:
        print("locked", flush=True)
        sys.stdin.read()
""")


class _Holder:
    """Another process holding a run's locks until the test ends it."""

    def __init__(self, path, what: str, shard: str = "") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RUN_HOLDER, str(path), what, shard],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def end(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def _extract_lock(store, shard=None):
    with store.writer_lock("spair", "tiny-flux", 1, 260, shard=shard):
        pass


def test_shard_jobs_and_a_whole_key_run_exclude_each_other(tmp_path):
    shard_and_whole_runs_exclude_each_other(FeatureStore(tmp_path / "s.zarr"))


def shard_and_whole_runs_exclude_each_other(store: FeatureStore) -> None:
    """The exclusion rules of one key's runs, against `store` (local here, S3 in test_object_store_locks)."""
    shard = _Holder(store.path, "extract", "0/2")
    try:
        with pytest.raises(DitfError, match="shard jobs are extracting spair/tiny-flux/k1/t260"):
            _extract_lock(store)  # a whole-key run while a shard job runs
        with pytest.raises(DitfError, match="shards of another count .*--shard i/3"):
            _extract_lock(store, "1/3")  # blocks of N=3 overlap those of N=2
        _extract_lock(store, "1/2")  # the other shard of the same run: side by side
    finally:
        shard.end()
    whole = _Holder(store.path, "extract")
    try:
        with pytest.raises(DitfError, match=r"another process is extracting spair/tiny-flux/k1/t260 .*without --shard"):
            _extract_lock(store, "0/2")
    finally:
        whole.end()
    _extract_lock(store, "0/2")
    _extract_lock(store)


def test_a_second_match_of_one_predictions_group_is_refused_overwrite_included(tmp_path):
    store = FeatureStore(tmp_path / "s.zarr")
    key = ("spair", "tiny-flux", 1, 260)
    holder = _Holder(store.path, "match")
    try:
        with pytest.raises(DitfError, match="another process is matching adaln\\+cd/nn of spair/tiny-flux/k1/t260"):
            with store.predictions_lock(key, "adaln+cd/nn", "test-12345678"):
                pass
        with store.predictions_lock(key, "adaln/nn", "test-12345678"):  # another variant is free
            pass
    finally:
        holder.end()
    with store.predictions_lock(key, "adaln+cd/nn", "test-12345678"):
        pass
