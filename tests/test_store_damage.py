"""Damaged stores: a clear error at read time, found by `ditf doctor`, fixed by `--repair` + rerun.

Each case damages a copy of one small store (features + predictions of a tiny-flux SPair demo),
then checks the four promises: reading gives one DitfError naming what is damaged (never zeros
or wrong numbers), the doctor reports it without crashing and without writing, `--repair` fixes
it, and a plain rerun of extract and match restores exactly the undamaged store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from _store_snapshot import differences, snapshot, without_store
from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.store.doctor import Findings, check_store
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.core.settings import MatchSettings as StageSettings
from ditf_pipeline.pipeline.stages import match, score
from ditf_pipeline.store.feature_store import FeatureStore

KEY = "spair/tiny-flux/k1/t260"
SETTINGS = StageSettings(variant="adaln+cd", channels="none")


def _extract(adapter, root: Path, store: Path) -> None:
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    Extractor(adapter, FeatureStore(store), settings).run(get_dataset("spair", root, "test"), progress=False)


def _match(root: Path, store: Path) -> None:
    match(FeatureStore(store), get_dataset("spair", root, "test"), "tiny-flux", 1, 260, SETTINGS, progress=False)


def _score(root: Path, store: Path) -> dict:
    return without_store(score(FeatureStore(store, read_only=True), get_dataset("spair", root, "test"), "tiny-flux", 1, 260,
                               SETTINGS))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from ditf_pipeline.models import load_adapter

    tmp = tmp_path_factory.mktemp("damage")
    root = make_spair_demo(tmp / "SPair", categories=("cat",), pairs_per_category=3)
    adapter = load_adapter("tiny-flux", device="cpu", dtype="fp32")
    clean = tmp / "clean.zarr"
    _extract(adapter, root, clean)
    _match(root, clean)
    return adapter, root, clean, snapshot(clean), _score(root, clean)


def _chunk(store: Path, array: str, row: int = 1) -> Path:
    """The file holding `row` of `array`: its own chunk, or the shard of ROWS_PER_SHARD rows it sits in."""
    meta = json.loads((store / KEY / array / "zarr.json").read_text())
    per_file = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    files = sorted(p for p in (store / KEY / array / "c").rglob("*") if p.is_file())
    return [p for p in files if p.relative_to(store / KEY / array / "c").parts[0] == str(row // per_file)][0]


def _vector_lost(store: Path, array: str, row: int = 1) -> None:
    """One image's chunk inside a shard reads as the fill value (NaN), as if it was never written."""
    zarr.open_array(str(store / KEY / array), mode="r+")[row] = np.nan


def _damage_shard_index(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # the shard's index (and its checksum) sits at the end of the file
    path.write_bytes(bytes(data))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# name -> (damage, what reading does (match or score), pattern of the read error)
CASES = {
    "deleted pre_adaln chunk": (lambda s: _chunk(s, "pre_adaln").unlink(), "match", r"pre_adaln chunk of committed image cat/\S+ is missing"),
    "deleted shift shard": (lambda s: _chunk(s, "shift").unlink(), "match", r"shift chunk of committed image cat/\S+ is missing"),
    "flipped byte in a shift shard": (lambda s: _flip(_chunk(s, "shift")), "match", r"shift chunk of image cat/\S+ is damaged"),
    "damaged index of a scale shard": (lambda s: _damage_shard_index(_chunk(s, "scale")), "match",
                                       r"scale chunk of image cat/\S+ is damaged"),
    "a vector missing from its shard": (lambda s: _vector_lost(s, "scale"), "match",
                                        r"scale vector of committed image cat/\S+ is missing"),
    "damaged complete shard": (lambda s: _flip(_chunk(s, "complete")), "match", r"array complete is damaged"),
    "flipped byte in pre_adaln": (lambda s: _flip(_chunk(s, "pre_adaln")), "match", r"pre_adaln chunk of image cat/\S+ is damaged"),
    "truncated grid shard": (lambda s: _chunk(s, "grid").write_bytes(_chunk(s, "grid").read_bytes()[:3]), "match",
                             r"grid chunk of image cat/\S+ is damaged"),
    "corrupt array metadata": (lambda s: (s / KEY / "gate" / "zarr.json").write_text("{not json"), "match",
                               r"metadata is damaged"),
    "corrupt group metadata": (lambda s: (s / KEY / "zarr.json").write_text("\x00garbage"), "match",
                               rf"the metadata of {KEY} is damaged"),
    "wrong dtype in metadata": (lambda s: _edit_json(s / KEY / "shift" / "zarr.json", data_type="int32"), "match",
                                # (zarr itself refuses it first: the NaN fill is no int32)
                                r"array shift has dtype int32 in its metadata, not float32|a feature key's metadata is damaged"),
    "flipped byte in predictions": (lambda s: _flip(next(p for p in (s / KEY / "predictions").rglob("pred/c/0/*/*"))),
                                    "score", r"pairs 0\.\.2 are damaged"),
    "corrupt root metadata": (lambda s: (s / "zarr.json").write_text("{"), "score", r"its zarr.json is damaged"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_a_clear_error_found_by_doctor_and_repaired(base, tmp_path, case):
    adapter, root, clean, want, want_score = base
    damage, reader, pattern = CASES[case]
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    damage(store)
    with pytest.raises(DitfError, match=pattern):
        if reader == "match":
            match(FeatureStore(store, read_only=True), get_dataset("spair", root, "test"), "tiny-flux", 1, 260,
                  SETTINGS, overwrite=True, progress=False)
        else:
            _score(root, store)
    before = _tree(store)
    findings = Findings()
    check_store(store, findings)
    assert findings.problems, case
    assert _tree(store) == before  # the doctor alone writes nothing
    repaired = Findings()
    check_store(store, repaired, repair=True)
    assert repaired.problems and repaired.open_problems == 0, (repaired.problems, repaired.repaired)
    _extract(adapter, root, store)
    _match(root, store)
    after = Findings()
    check_store(store, after)
    assert not after.problems, after.problems
    assert not differences(snapshot(store), want)
    assert _score(root, store) == want_score


def test_repair_keeps_intact_committed_images(base, tmp_path):
    """Only the damaged image is un-committed: the others are not extracted again."""
    adapter, root, clean, _, _ = base
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    _chunk(store, "pre_adaln", row=2).unlink()
    untouched = _chunk(store, "pre_adaln", row=0).read_bytes()
    check_store(store, Findings(), repair=True)
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    report = Extractor(adapter, FeatureStore(store), settings).run(get_dataset("spair", root, "test"), progress=False)
    assert (report.extracted, report.skipped) == (1, report.n_images - 1)
    assert _chunk(store, "pre_adaln", row=0).read_bytes() == untouched


def test_a_damaged_image_chunk_inside_a_shard_costs_that_image_only(base, tmp_path):
    """A flipped byte in one image's chunk of a shift shard: the repair keeps the shard's other
    committed images (their vectors and commits), so the rerun extracts one image."""
    adapter, root, clean, want, _ = base
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    shard = _chunk(store, "shift", row=1)
    inner = zarr.open_array(str(store / KEY / "shift"), mode="r").shape[1] * 4 + 4  # float32 vector + its crc32c
    data = bytearray(shard.read_bytes())
    data[inner + inner // 2] ^= 0xFF  # inside image 1's chunk (chunks in row order, the index at the end)
    shard.write_bytes(bytes(data))
    findings = Findings()
    check_store(store, findings)
    assert any("damaged inside an intact file" in p for p in findings.problems), findings.problems
    check_store(store, repaired := Findings(), repair=True)
    assert repaired.open_problems == 0, repaired.repaired
    complete = FeatureStore(store, read_only=True).open_features("spair", "tiny-flux", 1, 260).complete()
    assert int(complete.sum()) == len(complete) - 1  # one image un-committed, the others kept
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    report = Extractor(adapter, FeatureStore(store), settings).run(get_dataset("spair", root, "test"), progress=False)
    assert (report.extracted, report.skipped) == (1, report.n_images - 1)
    assert not differences(snapshot(store), want)


def test_a_damaged_image_index_chunk_is_repaired_and_the_rerun_completes(base, tmp_path):
    """Not "run --repair" again: the lost rows are un-committed and re-registered by the rerun."""
    adapter, root, clean, _, want_score = base
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    _flip(next(p for p in (store / "spair" / "images" / "key" / "c").rglob("*") if p.is_file()))
    findings = Findings()
    check_store(store, findings)
    assert any("image index rows 0..2 are damaged" in p for p in findings.problems), findings.problems
    check_store(store, repaired := Findings(), repair=True)
    assert repaired.open_problems == 0 and any("un-committed rows 0..2" in r for r in repaired.repaired), repaired.repaired
    settings = ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1)
    report = Extractor(adapter, FeatureStore(store), settings).run(get_dataset("spair", root, "test"), progress=False)
    assert report.extracted == report.n_images  # the images lost with their rows, registered and extracted anew
    match(FeatureStore(store), get_dataset("spair", root, "test"), "tiny-flux", 1, 260, SETTINGS, overwrite=True,
          progress=False)
    assert _score(root, store) == want_score
    check_store(store, after := Findings())
    assert not after.problems, after.problems


def test_half_done_setups_are_found_removed_and_do_not_block_a_rerun(base, tmp_path):
    """Leftover staging, and a schema-1 style key with arrays but no configuration or commit mark."""
    import zarr

    adapter, root, clean, want, _ = base
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    partial = store / KEY / "grid" / "c" / "0" / "0.1f2e3d4c.partial"  # what zarr leaves when killed mid-write
    partial.write_bytes(b"half")
    staged = store / ".ditf" / "staging" / "0123abcd"
    zarr.create_group(str(staged), attributes={"config": {}})
    half = zarr.open_group(str(store), mode="a").require_group("spair/tiny-flux/k1/t90")
    half.create_array("pre_adaln", shape=(3, 2, 2, 4), dtype="float16")
    assert FeatureStore(store, read_only=True).feature_keys() == [("spair", "tiny-flux", 1, 260)]  # invisible
    findings = Findings()
    check_store(store, findings)
    assert any("note: store: unfinished setup" in line for line in findings.ok), findings.ok  # litter, not damage
    assert any("interrupted by a crash" in line for line in findings.ok), findings.ok
    assert any("spair/tiny-flux/k1/t90: half-done setup" in p for p in findings.problems), findings.problems
    repaired = Findings()
    check_store(store, repaired, repair=True)
    assert repaired.open_problems == 0 and not staged.exists() and not (store / "spair/tiny-flux/k1/t90").exists()
    assert not partial.exists()
    assert not differences(snapshot(store), want)  # intact committed data untouched


def test_a_folder_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not yours")
    for read_only in (False, True):
        with pytest.raises(DitfError, match="not a ditf store"):
            FeatureStore(folder, read_only=read_only)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


@pytest.mark.slow
def test_cli_reports_damage_in_one_line(base, tmp_path):
    _, root, clean, _, _ = base
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    (store / KEY / "zarr.json").write_text("{")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ditf_cli.main", *map(str, args)], capture_output=True, text=True, env=env)

    common = ["--model", "tiny-flux", "--data-root", root, "--store", store, "--k", "1", "--t", "260"]
    for result in (cli("match", *common, "--no-progress", "--overwrite"), cli("score", *common)):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and "damaged" in result.stderr, result.stderr
    doctor = cli("doctor", "--store", store)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr + doctor.stdout
    assert "PROBLEM  store: the metadata of spair/tiny-flux/k1/t260 is damaged" in doctor.stdout, doctor.stdout
    fixed = cli("doctor", "--store", store, "--repair")
    assert fixed.returncode == 0 and "REPAIRED removed spair/tiny-flux/k1/t260" in fixed.stdout, fixed.stdout
