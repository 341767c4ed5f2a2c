"""`--shard i/N` splits deterministically, covers everything once, refuses bad specs, and shards
run at once (extract and match) give a store identical to one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _store_snapshot import differences, snapshot

from ditf_pipeline.demo import make_spair_demo

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.shards import Shard


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_items_and_blocks(count):
    items = list(range(23))
    shards = [Shard(i, count) for i in range(count)]
    chosen = [x for shard in shards for x in shard.select(items)]
    assert sorted(chosen) == items  # every item exactly once
    starts = [s for shard in shards for s in shard.blocks(23, 4)]
    assert sorted(starts) == list(range(0, 23, 4))  # every block exactly once
    assert Shard.parse(f"{count - 1}/{count}").select(items) == shards[-1].select(items)


@pytest.mark.parametrize("text", ["3/3", "-1/4", "1/0", "a/b", "2", "1/2/3", " / "])
def test_bad_shard_specs_are_one_clear_error(text):
    with pytest.raises(DitfError, match="--shard"):
        Shard.parse(text)


def test_no_shard_is_the_whole_dataset():
    assert Shard.parse(None).whole and Shard.parse("0/1").whole
    assert Shard.parse(" 2 / 5 ") == Shard(2, 5)


# ---- end to end: shards running at once equal one run, bit for bit ---------------------------------
COMMON = ["--model", "tiny-flux", "--dataset", "spair", "--k", "2", "--t", "260"]
EXTRACT = ["--img-size", "64", "--ensemble-size", "2", "--dtype", "fp32", "--device", "cpu", "--quiet"]
MATCH = ["--variant", "adaln+cd", "--device", "cpu", "--jobs", "1", "--quiet"]


def _ditf(args: list[str], rows_per_shard: int = 2) -> subprocess.Popen:
    # several pair blocks per shard, and image rows handed out in blocks of 2 (not 32): shards interleave
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DITF_MATCH_BLOCK": "2", "DITF_ROWS_PER_SHARD": str(rows_per_shard)}
    return subprocess.Popen([sys.executable, "-m", "ditf_cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]


@pytest.mark.slow
def test_shards_at_once_equal_one_run(tmp_path: Path):
    root = make_spair_demo(tmp_path / "SPair", categories=("cat", "dog"), pairs_per_category=4)
    data = ["--data-root", str(root)]
    single, sharded = str(tmp_path / "single.zarr"), str(tmp_path / "sharded.zarr")
    _all([_ditf(["extract", *COMMON, *data, "--store", single, *EXTRACT])])
    _all([_ditf(["match", *COMMON, *data, "--store", single, *MATCH])])
    # three shards of extract, all at once (they share the key's setup, then write their own images)
    _all([_ditf(["extract", *COMMON, *data, "--store", sharded, *EXTRACT, "--shard", f"{i}/3"]) for i in range(3)])
    # a rerun of a finished shard finds its images complete
    rerun = _ditf(["extract", *COMMON, *data, "--store", sharded, *EXTRACT, "--shard", "1/3"])
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "0 image(s) extracted" in out
    # two shards of match, at once
    _all([_ditf(["match", *COMMON, *data, "--store", sharded, *MATCH, "--shard", f"{i}/2"]) for i in range(2)])
    assert differences(snapshot(sharded), snapshot(single)) == []
    score = [_ditf(["score", *COMMON, *data, "--store", s, "--variant", "adaln+cd", "--format", "json"]) for s in (single, sharded)]
    outs = [p.communicate(timeout=600)[0] for p in score]
    assert all(p.returncode == 0 for p in score)
    assert outs[0].replace(single, "STORE") == outs[1].replace(sharded, "STORE")


@pytest.mark.slow
def test_one_shard_alone_extracts_only_its_images(tmp_path: Path):
    from ditf_pipeline.store.feature_store import FeatureStore

    root = make_spair_demo(tmp_path / "SPair", categories=("cat",), pairs_per_category=3)
    store = str(tmp_path / "s.zarr")
    _all([_ditf(["extract", *COMMON, "--data-root", str(root), "--store", store, *EXTRACT, "--shard", "0/2"])])
    arrays = FeatureStore(store, read_only=True).open_features("spair", "tiny-flux", 2, 260)
    complete = arrays.complete()
    # rows in dataset order, every other block of 2 (a block's small arrays are one file: one writer each)
    assert complete.tolist() == [(i // 2) % 2 == 0 for i in range(len(complete))]
    bad = _ditf(["match", *COMMON, "--data-root", str(root), "--store", store, *MATCH, "--shard", "0/2", "--overwrite"])
    _, err = bad.communicate(timeout=600)
    assert bad.returncode == 1 and err.count("error:") == 1 and "--overwrite with --shard" in err


@pytest.mark.slow
def test_shard_ownership_is_the_keys_not_the_environments(tmp_path: Path):
    """The key was created with files of 2 images; a shard run later under another
    DITF_ROWS_PER_SHARD still takes the blocks of 2 that are its own, so the shards together
    extract every image once."""
    from ditf_pipeline.store.feature_store import FeatureStore

    root = make_spair_demo(tmp_path / "SPair", categories=("cat",), pairs_per_category=3)
    store = str(tmp_path / "s.zarr")
    args = ["extract", *COMMON, "--data-root", str(root), "--store", store, *EXTRACT]
    _all([_ditf([*args, "--shard", "0/2"], rows_per_shard=2)])
    _all([_ditf([*args, "--shard", "1/2"], rows_per_shard=3)])
    complete = FeatureStore(store, read_only=True).open_features("spair", "tiny-flux", 2, 260).complete()
    assert complete.all(), complete.tolist()
    rerun = _ditf(args, rows_per_shard=3)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "0 image(s) extracted" in out
