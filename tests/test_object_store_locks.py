"""Writers of an object store kept apart as on a local one: leases for runs, conditional writes
for the image index. Against moto's S3 server (the `s3` fixture of test_object_store)."""

from __future__ import annotations

import json
import time

import pytest

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.store.feature_store import FeatureStore

from test_object_store import _fs, s3  # noqa: F401 - the module's S3 server, as a fixture here
from test_store_locks import _extract_lock, _Holder

LOCKS = ".ditf/locks/spair%tiny-flux%k1%t260"


def _plant_lease(url: str, suffix: str, expires_in: float) -> None:
    """A lease of another host's writer, live or expired (`expires_in` < 0)."""
    lease = {"owner": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "expires": time.time() + expires_in}
    _fs().pipe_file(f"{url[5:]}/{LOCKS}{suffix}.lease", json.dumps(lease).encode())


# ---- runs of one key: shard jobs and whole-key runs (mirrors test_store_locks) -------------------------
def test_shard_jobs_and_a_whole_key_run_exclude_each_other_on_an_object_store(s3):  # noqa: F811
    url = f"{s3}/runs.zarr"
    store = FeatureStore(url)
    shard = _Holder(url, "extract", "0/2")
    try:
        with pytest.raises(DitfError, match="shard jobs are extracting spair/tiny-flux/k1/t260"):
            _extract_lock(store)  # a whole-key run while a shard job runs
        with pytest.raises(DitfError, match="shards of another count .*--shard i/3"):
            _extract_lock(store, "1/3")  # blocks of N=3 overlap those of N=2
        _extract_lock(store, "1/2")  # the other shard of the same run: side by side
    finally:
        shard.end()
    whole = _Holder(url, "extract")
    try:
        with pytest.raises(DitfError, match=r"another process is extracting spair/tiny-flux/k1/t260 .*without --shard"):
            _extract_lock(store, "0/2")
    finally:
        whole.end()
    _extract_lock(store, "0/2")
    _extract_lock(store)


@pytest.mark.parametrize("suffix, run", [("%whole", "0/2"), ("%shard-1-of-3", None), ("%shard-1-of-3", "0/2")])
def test_an_expired_lease_of_another_run_does_not_keep_a_run_out(s3, suffix, run):  # noqa: F811
    url = f"{s3}/stale{suffix.replace('%', '-')}-{run is None}.zarr"
    store = FeatureStore(url)
    _plant_lease(url, suffix, expires_in=300)
    with pytest.raises(DitfError, match="another process|shard jobs|shards of another count"):
        _extract_lock(store, run)  # live: refused
    _plant_lease(url, suffix, expires_in=-5)
    _extract_lock(store, run)  # its holder stopped renewing it long ago: not a running writer
