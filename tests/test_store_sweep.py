"""What a dead writer leaves is swept by the next writer that can prove it dead, never a live one's.

Writers are real processes (POSIX locks belong to processes): a child opens the store, builds
something in staging, and either dies (SIGKILL, right before a named store write) or waits
alive while the parent tries to sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ditf_pipeline.store.doctor import Findings, check_store
from ditf_pipeline.store.feature_store import FeatureStore

#: a child writer: opens the store, stages a group, leaves a zarr-style temp file, then waits for a
#: line on stdin (alive) or is killed right before its next store write (DITF_KILL_AT_WRITE)
_WRITER = textwrap.dedent("""
    import sys, zarr
    from ditf_pipeline.store.feature_store import FeatureStore
    store = FeatureStore(sys.argv[1])
    staged = store.backend.new_staging()
    zarr.create_group(store=store.backend.zarr_store(staged), attributes={"half": True})
    (store.path / staged / "x.1234abcd.partial").write_bytes(b"half")
    print(staged, flush=True)
    sys.stdin.readline()
    store.root.require_group("after")  # a store write: DITF_KILL_AT_WRITE kills the child right before it
""")


def _writer(store: Path, kill_at: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DITF_KILL_AT_WRITE", None)
    if kill_at is not None:
        env["DITF_KILL_AT_WRITE"] = str(kill_at)
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def _new_store(path: Path) -> Path:
    FeatureStore(path).close()
    return path


def _kill_after_staging(store: Path) -> str:
    """A writer that stages a group and is killed right before its next store write: its staging folder."""
    child = _writer(store, kill_at=3)  # 1: staged group's zarr.json, 2: the root's copy dropped... 3: the next
    staged = child.stdout.readline().strip()
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(timeout=120) == -9
    assert (store / staged / "zarr.json").is_file()
    return staged


def test_a_dead_writers_leftovers_are_a_note_and_the_next_writer_sweeps_them(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    staged = _kill_after_staging(store)
    findings = Findings()
    check_store(store, findings)
    assert findings.open_problems == 0, findings.problems  # litter, not damage: doctor exits 0
    assert any(line.startswith("note: store: unfinished setup") for line in findings.ok), findings.ok
    assert any("interrupted by a crash" in line for line in findings.ok), findings.ok

    FeatureStore(store).close()  # the next writer, alone: the dead writer's leftovers go before it starts
    assert not (store / staged).exists()
    assert not list(store.rglob("*.partial"))
    assert os.listdir(store / ".ditf" / "writers") == []  # the dead writer's marker too
    check_store(store, again := Findings())
    assert not [line for line in again.ok if line.startswith("note:")], again.ok


def test_a_live_writers_staging_is_never_swept(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    child = _writer(store)
    staged = child.stdout.readline().strip()
    try:
        FeatureStore(store).close()  # another writer starts and ends while the child lives
        check_store(store, repaired := Findings(), repair=True)
        assert (store / staged / "zarr.json").is_file()  # its setup under way is untouched
        assert list(store.rglob("*.partial"))
        assert not [line for line in repaired.repaired if staged in line], repaired.repaired
        assert any("unfinished setup" in line for line in repaired.ok)
    finally:
        child.kill()
        child.wait()
    FeatureStore(store).close()  # its writer is dead now: swept
    assert not (store / staged).exists() and not list(store.rglob("*.partial"))


def test_doctor_repair_sweeps_a_dead_writers_leftovers(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    staged = _kill_after_staging(store)
    check_store(store, repaired := Findings(), repair=True)
    assert repaired.open_problems == 0
    assert not (store / staged).exists() and not list(store.rglob("*.partial"))


def test_a_writer_with_nothing_to_write_restores_a_dropped_consolidated_copy(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    with FeatureStore(store) as writer:
        writer.root.require_group("spair")
    assert "consolidated_metadata" in json.loads((store / "zarr.json").read_text())
    root = json.loads((store / "zarr.json").read_text())
    root.pop("consolidated_metadata")  # what a writer killed before its closing write leaves
    (store / "zarr.json").write_text(json.dumps(root))
    FeatureStore(store).close()  # writes nothing else
    meta = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert "spair" in meta


def test_a_store_creation_killed_before_its_first_write_is_removed_by_the_next_creator(tmp_path):
    store = tmp_path / "new.zarr"
    env = {**os.environ, "DITF_KILL_AT_WRITE": "1"}
    code = "import sys; from ditf_pipeline.store.feature_store import FeatureStore; FeatureStore(sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", code, str(store)], env=env).returncode == -9
    (stray,) = tmp_path.glob(".new.zarr.ditf-new-*")
    check_store(store, Findings())  # no store yet: nothing to read, nothing changed
    assert stray.exists()
    FeatureStore(store).close()
    assert not stray.exists() and (store / "zarr.json").is_file()
    assert not list(tmp_path.glob(".new.zarr.ditf-new-*"))
