"""Files per image (zarr shards for the small per-image arrays) and consolidated metadata that is
never stale: written by the last writer only, dropped by every writer as it opens the store."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.store.feature_store import ROWS_PER_SHARD, FeatureStore

KEY = "spair/tiny-flux/k1/t260"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ditf_pipeline.models import load_adapter

    tmp = tmp_path_factory.mktemp("layout")
    root = make_spair_demo(tmp / "SPair", categories=("cat",), pairs_per_category=3)
    return load_adapter("tiny-flux", device="cpu", dtype="fp32"), root


def _extract(demo, store: Path, ks=(1,)) -> None:
    adapter, root = demo
    settings = ExtractSettings(ks=list(ks), ts=[260], img_size=64, ensemble_size=1)
    with FeatureStore(store) as feature_store:
        Extractor(adapter, feature_store, settings).run(get_dataset("spair", root, "test"), progress=False)


def _consolidated(store: Path) -> dict | None:
    return json.loads((store / "zarr.json").read_text()).get("consolidated_metadata")


def test_an_image_adds_one_file_plus_its_share_of_a_shard(demo, tmp_path):
    store = tmp_path / "s.zarr"
    _extract(demo, store)
    group = store / KEY
    n = len(FeatureStore(store, read_only=True).image_rows("spair"))
    per_array = {a.name: [p for p in (a / "c").rglob("*") if p.is_file()] for a in group.iterdir() if (a / "c").is_dir()}
    assert len(per_array["pre_adaln"]) == n  # the features: one file per image
    small = [name for name in per_array if name != "pre_adaln"]
    assert sorted(small) == sorted(["grid", "complete", "shift", "scale", "gate",
                                    "shift_t", "scale_t", "gate_t", "shift_c", "scale_c", "gate_c"])
    for name in small:  # every other array: one file per ROWS_PER_SHARD images
        assert len(per_array[name]) == math.ceil(n / ROWS_PER_SHARD), name
    # so a key holds n + ceil(n / 32) * 11 chunk files: at most 2 per image from 11 images on
    # (1.34 per image for a full shard; schema 2 wrote 12 per image)
    files = sum(len(v) for v in per_array.values())
    assert files == n + math.ceil(n / ROWS_PER_SHARD) * len(small)
    assert 1 + len(small) / ROWS_PER_SHARD <= 2


def test_the_last_writer_consolidates_and_a_reader_opens_with_one_metadata_read(demo, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    _extract(demo, store)
    consolidated = _consolidated(store)
    assert consolidated is not None and KEY in consolidated["metadata"] and f"{KEY}/pre_adaln" in consolidated["metadata"]
    reads: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        reads.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    reader = FeatureStore(store, read_only=True)
    arrays = reader.open_features("spair", "tiny-flux", 1, 260)
    assert arrays.hidden_size > 0 and arrays.modulation_names
    assert [key for key in reads if key.endswith("zarr.json")] == ["zarr.json"]


def test_a_writer_drops_the_copy_at_once_and_only_the_last_writer_writes_it(demo, tmp_path):
    store = tmp_path / "s.zarr"
    _extract(demo, store)
    assert _consolidated(store) is not None
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from ditf_pipeline.store.feature_store import FeatureStore
        store = FeatureStore(sys.argv[1])
        print("open", flush=True)
        sys.stdin.readline()
        store.open_features("spair", "tiny-flux", 1, 260).set_massive_channels([5])
        print("wrote", flush=True)
        sys.stdin.readline()
        print(store.close(), flush=True)
    """), str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert holder.poll() is None  # the other writer is really there
        assert _consolidated(store) is not None  # opening for writing changes nothing yet
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "wrote"
        assert _consolidated(store) is None  # dropped right before that writer's first write
        _extract(demo, store, ks=(1, 2))  # this writer adds a key, but is not the last: no copy yet
        assert _consolidated(store) is None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "True"  # the last writer wrote it
    finally:
        holder.kill()
        holder.wait(timeout=60)
    copy = _consolidated(store)["metadata"]
    assert "spair/tiny-flux/k2/t260" in copy  # it holds the other writer's key
    assert copy[KEY]["attributes"]["massive_channels"] == [5]  # and its own last change
    assert FeatureStore(store, read_only=True).feature_keys("spair") == [("spair", "tiny-flux", 1, 260),
                                                                        ("spair", "tiny-flux", 2, 260)]


def test_a_killed_writer_leaves_no_copy_and_readers_see_everything(demo, tmp_path):
    store = tmp_path / "s.zarr"
    _extract(demo, store)
    assert _consolidated(store) is not None
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        import numpy as np
        from ditf_pipeline.store.feature_store import FeatureStore
        store = FeatureStore(sys.argv[1])
        store.open_features("spair", "tiny-flux", 1, 260).set_massive_channels([3], {"why": "test"})
        print("written", flush=True)
        sys.stdin.read()
    """), str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
        assert writer.poll() is None
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert _consolidated(store) is None
    reader = FeatureStore(store, read_only=True)
    assert reader.open_features("spair", "tiny-flux", 1, 260).massive_channels == [3]  # not a stale copy


# ---- schema-2 keys (one chunk file per image for every array) keep working ----------------------
def _to_schema_2(path: Path) -> None:
    """Rewrite a store's small per-image arrays the way schema 2 wrote them: unsharded, fill 0."""
    import zarr

    root = zarr.open_group(str(path), mode="a", use_consolidated=False)
    root.attrs["ditf_schema_version"] = 2
    key = root[KEY]
    for name, array in list(key.arrays()):
        if name == "pre_adaln":
            continue
        values = array[...]
        if values.dtype.kind == "f":
            assert not np.isnan(values).any()
        copy = key.create_array(name, shape=array.shape, chunks=(1, *array.shape[1:]), dtype=array.dtype,
                                fill_value=False if values.dtype == bool else 0, compressors=(zarr.codecs.Crc32cCodec(),),
                                dimension_names=array.metadata.dimension_names, overwrite=True)
        copy[...] = values
    (path / "zarr.json").write_text(json.dumps({k: v for k, v in json.loads((path / "zarr.json").read_text()).items()
                                                if k != "consolidated_metadata"}))


def test_a_schema_2_key_is_read_resumed_checked_and_repaired_as_it_is(demo, tmp_path):
    from ditf_pipeline.store.doctor import Findings, check_store

    adapter, root = demo
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    _extract(demo, new)
    shutil.copytree(new, old)
    _to_schema_2(old)
    assert len(list((old / KEY / "shift" / "c").iterdir())) == len(FeatureStore(old, read_only=True).image_rows("spair"))
    want = FeatureStore(new, read_only=True).open_features("spair", "tiny-flux", 1, 260).read_image(1)
    got = FeatureStore(old, read_only=True).open_features("spair", "tiny-flux", 1, 260).read_image(1)
    assert np.array_equal(got[0], want[0]) and all(np.array_equal(got[1][n], want[1][n]) for n in want[1])
    findings = Findings()
    check_store(old, findings)
    assert not findings.problems, findings.problems
    # a deleted chunk of a committed schema-2 image: an error, found, repaired, redone alone
    (old / KEY / "shift" / "c" / "1" / "0").unlink()
    with pytest.raises(DitfError, match="shift chunk of committed image"):
        FeatureStore(old, read_only=True).open_features("spair", "tiny-flux", 1, 260).read_image(1)
    check_store(old, Findings(), repair=True)
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    with FeatureStore(old) as store:
        report = Extractor(adapter, store, settings).run(get_dataset("spair", root, "test"), progress=False)
    assert (report.extracted, report.skipped) == (1, report.n_images - 1)
    assert zarr_chunks(old / KEY / "shift") == (1, 32)  # the key kept its schema-2 layout
    got = FeatureStore(old, read_only=True).open_features("spair", "tiny-flux", 1, 260).read_image(1)
    assert np.array_equal(got[0], want[0]) and all(np.array_equal(got[1][n], want[1][n]) for n in want[1])


def zarr_chunks(array: Path) -> tuple[int, ...]:
    meta = json.loads((array / "zarr.json").read_text())
    return tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])


def test_dask_tasks_never_split_a_block_of_rows():
    """Two workers must never rewrite one shard: a task takes whole blocks of ROWS_PER_SHARD rows."""
    from types import SimpleNamespace

    from ditf_pipeline.distributed.runners import _row_block_chunks

    records = [SimpleNamespace(key=f"im{i}") for i in range(100)]
    rows = {r.key: (i * 7) % 100 for i, r in enumerate(records)}  # rows in another order than the records
    todo = [r for r in records if rows[r.key] % 3]  # some already complete
    chunks = _row_block_chunks(todo, rows, size=4)
    assert sorted(r.key for chunk in chunks for r in chunk) == sorted(r.key for r in todo)
    owner = {}
    for index, chunk in enumerate(chunks):
        for record in chunk:
            assert owner.setdefault(rows[record.key] // ROWS_PER_SHARD, index) == index
    assert len(chunks) == len(owner)  # with blocks larger than `size`, one task per block


def _problems(store) -> list[str]:
    from ditf_pipeline.store.doctor import Findings, check_store

    check_store(store, found := Findings())
    return found.problems


@pytest.mark.parametrize("edit", ["attribute changed by hand", "node removed by hand"])
def test_doctor_finds_a_stale_consolidated_copy_and_repair_drops_it(demo, tmp_path, edit):
    from ditf_pipeline.store.doctor import Findings, check_store

    store = tmp_path / "s.zarr"
    _extract(demo, store)
    assert _consolidated(store) is not None
    if edit == "attribute changed by hand":
        meta = json.loads((store / KEY / "zarr.json").read_text())
        meta["attributes"]["massive_channels"] = [7]
        (store / KEY / "zarr.json").write_text(json.dumps(meta))
    else:
        shutil.rmtree(store / "prompts")
    findings = Findings()
    check_store(store, findings)
    assert any("consolidated metadata in the root zarr.json is stale" in p for p in findings.problems), findings.problems
    check_store(store, Findings(), repair=True)
    fresh = _consolidated(store)  # dropped, then written anew by the repairing writer as it ended
    assert fresh is None or not any("stale" in p for p in _problems(store))
    if edit == "attribute changed by hand":  # readers now see the node as it is
        assert FeatureStore(store, read_only=True).open_features("spair", "tiny-flux", 1, 260).massive_channels == [7]
        after = Findings()
        check_store(store, after)
        assert not after.problems, after.problems


def test_a_refused_command_adds_no_consolidated_copy(demo, tmp_path):
    """A writer that wrote nothing (refused after opening the store) leaves the root as it was."""
    _, root = demo
    store = tmp_path / "s.zarr"
    _extract(demo, store)
    meta = json.loads((store / "zarr.json").read_text())  # a store without a copy (as older ditf wrote them)
    del meta["consolidated_metadata"]
    (store / "zarr.json").write_text(json.dumps(meta))
    before = (store / "zarr.json").read_bytes()
    refused = subprocess.run([sys.executable, "-m", "ditf_cli.main", "match", "--model", "tiny-flux", "--data-root",
                              str(root), "--store", str(store), "--k", "1", "--t", "260", "--channels", "99999",
                              "--overwrite", "--no-progress"], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 1 and "out of range" in refused.stderr, refused.stderr
    assert (store / "zarr.json").read_bytes() == before


def test_chunks_equal_to_the_fill_value_are_written_with_no_process_wide_zarr_setting(tmp_path):
    """An all-zero feature map is still a chunk file: a missing chunk of a committed image always
    means damage. The store asks zarr for it per array, leaving the process's zarr config as it was."""
    store = FeatureStore(tmp_path / "s.zarr")
    arrays = store.open_features("spair", "m", 1, 2, config={"x": 1}, n_images=2, grid_max=(2, 2), hidden_size=4)
    arrays.write_image(0, np.zeros((2, 2, 4), np.float16), {n: np.zeros(4, np.float32) for n in arrays.modulation_names})
    assert zarr.config.get("array.write_empty_chunks") is False  # zarr's own default, untouched
    assert (tmp_path / "s.zarr" / "spair" / "m" / "k1" / "t2" / "pre_adaln" / "c" / "0" / "0" / "0" / "0").is_file()
    pre_adaln, _ = arrays.read_image(0)  # found, not "chunk missing"
    assert not pre_adaln.any()
