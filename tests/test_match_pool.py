"""`ditf match --jobs N` on workers (`match/pool.py`): spans with work stealing, one error line
when a worker fails or dies, no orphan when the parent dies, no re-run of the calling script.
(The same bits as one job, and a worker's error as one job's: `test_match_parallel.py`.)

The CLI tests (a worker killed, `ditf` killed, Ctrl-C) have the worker process stop itself
(SIGSTOP) when its first block arrives (`pool.PAUSE_ENV`), so nothing depends on timing: its
block cannot come back until the test decides what happens next.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.match import pool
from ditf_pipeline.match.pool import Spans
from ditf_pipeline.store.feature_store import FeatureStore

from _store_snapshot import differences, snapshot


# ---- which block each worker does next -----------------------------------------------------------------
def test_each_worker_walks_its_own_span_then_steals_from_the_back_of_the_fullest():
    spans = Spans(10, 3)  # [0, 3), [3, 7), [7, 10)
    assert (spans.front, spans.end) == ([0, 3, 7], [3, 7, 10])
    assert [spans.next(0) for _ in range(3)] == [0, 1, 2]
    assert spans.next(1) == 3
    # worker 0's span is empty: it steals from the back of worker 1's span (3 left, the most)
    assert spans.next(0) == 6
    assert spans.next(2) == 7
    taken = [spans.next(0) for _ in range(4)]  # spans 1 and 2 have 2 left each: the back of either
    assert sorted(taken) == [4, 5, 8, 9] and spans.next(0) is None and spans.next(1) is None


@pytest.mark.parametrize("n_blocks, workers", [(1, 1), (5, 2), (7, 3), (64, 5), (3, 3)])
def test_every_block_is_handed_out_exactly_once(n_blocks, workers):
    spans = Spans(n_blocks, workers)
    sizes = [e - f for f, e in zip(spans.front, spans.end)]
    assert max(sizes) - min(sizes) <= 1
    seen, turn = [], 0
    while (index := spans.next(turn % workers)) is not None or any(e > f for f, e in zip(spans.front, spans.end)):
        if index is not None:
            seen.append(index)
        turn += 1
    assert sorted(seen) == list(range(n_blocks))


def test_worker_failing_outside_ditf_names_itself():
    def make_runner():
        return lambda block: 1 / 0

    with pytest.raises(RuntimeError, match="match worker 0 failed:(.|\n)*ZeroDivisionError"):
        list(pool.WorkerPool(1).run([(0, [1]), (1, [2])], make_runner))


# ---- the real CLI: a worker killed, the parent killed, Ctrl-C------------------------------------------------
COMMON = ["--model", "tiny-flux", "--dataset", "spair", "--k", "1", "--t", "260"]
MATCH = ["match", *COMMON, "--variant", "adaln+cd", "--device", "cpu", "--quiet"]


def _ditf(args, pause: bool = False) -> subprocess.Popen:
    """`ditf ARGS` in its own process group (as a shell runs a command: a Ctrl-C reaches that group);
    with `pause`, its worker process stops itself when its first block arrives (`pool.PAUSE_ENV`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DITF_MATCH_BLOCK": "1", "DITF_MATCH_POOL_MIN_PAIRS": "1",
           **({pool.PAUSE_ENV: "1"} if pause else {})}
    return subprocess.Popen([sys.executable, "-m", "ditf_cli.main", *map(str, args)], env=env, process_group=0,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state(pid: int) -> str | None:
    """The kernel's state letter of `pid` (R, S, T, Z, ...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _ends(pid: int) -> bool:
    """Whether `pid` ends (or is a zombie: ended, not reaped) within a minute."""
    for _ in range(6000):
        if _state(pid) in (None, "Z"):
            return True
        time.sleep(0.01)
    return False


def _stopped_worker(parent: subprocess.Popen) -> int:
    """The match worker process of `parent`, once it has stopped itself with its first block in
    flight (`pool.PAUSE_ENV`: it cannot finish that block until the test decides what happens)."""
    worker = None
    for _ in range(6000):
        if worker is None:
            for task in Path(f"/proc/{parent.pid}/task").glob("*"):
                for child in (task / "children").read_text().split() if (task / "children").exists() else []:
                    try:
                        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"from ditf_pipeline.match.pool import" in cmdline:
                        worker = int(child)
        if worker is not None and _state(worker) == "T":
            return worker
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.01)
    raise AssertionError("no worker process stopped with a block")


def _done_blocks(store: Path) -> int:
    with warnings.catch_warnings(), FeatureStore(store, read_only=True) as opened:
        warnings.simplefilter("ignore")  # read while `ditf` writes: its temporary files are seen too
        groups = opened.root["spair/tiny-flux/k1/t260/predictions"]
        split = next(iter(groups.group_keys()))
        return int(np.asarray(groups[f"{split}/adaln+cd/dift/done"][:]).sum())


def _wait_for_written_blocks(store: Path, parent: subprocess.Popen) -> None:
    """Until this process wrote a block (its own worker thread goes on while worker 1 is frozen)."""
    for _ in range(6000):
        try:
            if _done_blocks(store) > 0:
                return
        except (KeyError, StopIteration, DitfError):
            pass
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.01)
    raise AssertionError("no block was written")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A tiny-flux store of a 2-category SPair demo, and the predictions of one job."""
    tmp = tmp_path_factory.mktemp("pool-cli")
    root = make_spair_demo(tmp / "SPair", categories=("cat", "dog"), pairs_per_category=4)
    store = tmp / "extracted.zarr"
    run = _ditf(["extract", *COMMON, "--data-root", root, "--store", store, "--img-size", "64", "--ensemble-size", "1",
                 "--dtype", "fp32", "--device", "cpu", "--quiet"])
    assert run.wait(timeout=600) == 0, run.communicate()
    reference = tmp / "reference.zarr"
    shutil.copytree(store, reference)
    run = _ditf([*MATCH, "--data-root", root, "--store", reference, "--jobs", "1"])
    assert run.wait(timeout=600) == 0, run.communicate()
    return tmp, root, store, snapshot(reference)


def _match_with_a_frozen_worker(extracted, name: str) -> tuple[Path, subprocess.Popen, int]:
    """`ditf match --jobs 2` on a copy of the extracted store, its worker process frozen, and
    at least one block written by the worker thread of the parent: (store, parent, worker pid)."""
    tmp, root, store, _ = extracted
    work = tmp / f"{name}.zarr"
    shutil.copytree(store, work)
    parent = _ditf([*MATCH, "--data-root", root, "--store", work, "--jobs", "2"], pause=True)
    worker = _stopped_worker(parent)
    _wait_for_written_blocks(work, parent)
    return work, parent, worker


@pytest.mark.slow
def test_a_killed_worker_is_one_error_line_and_the_rerun_resumes(extracted):
    _, root, _, reference = extracted
    work, parent, worker = _match_with_a_frozen_worker(extracted, "worker-killed")
    assert _state(worker) == "T"  # alive (frozen) when killed
    os.kill(worker, signal.SIGKILL)
    out, err = parent.communicate(timeout=300)
    assert parent.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: match worker 1 stopped") and "signal 9" in lines[0], err
    assert "Traceback" not in err
    written = _done_blocks(work)
    assert 0 < written < 8
    rerun = _ditf([*MATCH, "--data-root", root, "--store", work, "--jobs", "2"])
    assert rerun.wait(timeout=600) == 0, rerun.communicate()
    assert differences(snapshot(work), reference) == []


@pytest.mark.slow
def test_a_killed_parent_leaves_no_worker_behind_and_nothing_written(extracted):
    work, parent, worker = _match_with_a_frozen_worker(extracted, "parent-killed")
    assert parent.poll() is None  # alive when killed
    parent.kill()
    parent.wait(timeout=60)
    before = snapshot(work)
    os.kill(worker, signal.SIGCONT)  # it finds its parent gone at its next message and stops
    assert _ends(worker), "the worker outlived its parent"
    assert differences(snapshot(work), before) == []  # workers never write


@pytest.mark.slow
def test_a_script_without_a_main_guard_works_and_is_not_run_again(extracted):
    """Workers import ditf, not the calling script (multiprocessing's spawn would run its top
    level again in every worker, its --overwrite included)."""
    tmp, root, store, reference = extracted
    work = tmp / "script.zarr"
    shutil.copytree(store, work)
    script = tmp / "plain.py"
    script.write_text(
        "import os\n"
        "from ditf_pipeline.datasets import get_dataset\n"
        "from ditf_pipeline.match.predict import MatchSettings, predict\n"
        "from ditf_pipeline.store.feature_store import FeatureStore\n"
        "print('top level run by', os.getpid(), flush=True)\n"
        f"data = get_dataset('spair', {str(root)!r}, 'test')\n"
        f"with FeatureStore({str(work)!r}) as store:\n"
        "    predict(store, data, 'tiny-flux', 1, 260, MatchSettings(variant='adaln+cd', jobs=3), overwrite=True,\n"
        "            progress=False)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DITF_MATCH_BLOCK": "1", "DITF_MATCH_POOL_MIN_PAIRS": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("top level run by") == 1
    assert differences(snapshot(work), reference) == []


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_stops_the_workers(extracted):
    _, root, _, reference = extracted
    work, parent, worker = _match_with_a_frozen_worker(extracted, "interrupted")
    assert parent.poll() is None and _state(worker) == "T"  # both alive when interrupted
    # the worker is outside the command's group: a Ctrl-C cannot hit it while its interpreter
    # starts (before it ignores SIGINT), when Python would die with a traceback
    assert os.getpgid(worker) != os.getpgid(parent.pid)
    os.killpg(parent.pid, signal.SIGINT)  # a terminal's Ctrl-C: to the command's process group
    os.kill(worker, signal.SIGCONT)
    out, err = parent.communicate(timeout=300)
    assert parent.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted: completed images are kept; rerun the same command to resume"], err
    assert _ends(worker)
    rerun = _ditf([*MATCH, "--data-root", root, "--store", work, "--jobs", "2"])
    assert rerun.wait(timeout=600) == 0, rerun.communicate()
    assert differences(snapshot(work), reference) == []


# ---- workers that boot late --------------------------------------------------------------------------------
def test_a_worker_still_booting_holds_up_nothing(tmp_path, monkeypatch):
    """Worker 0 (this process's thread) starts at once; a worker process gets work only once it
    has booted, so one that never finishes booting leaves every block to the others (before,
    the parent handed it work and blocks up front and waited for them: this test hung)."""
    (tmp_path / "slow_boot.py").write_text("import time\n\ndef hang():\n    time.sleep(3600)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    workers = pool.WorkerPool(2, preload=("slow_boot:hang",))
    process = workers._processes[0][1]
    blocks = [(i, [i]) for i in range(6)]
    results = dict(workers.run(blocks, lambda: (lambda block: [10 * p for p in block])))
    assert results == {i: [10 * i] for i in range(6)}
    assert process.poll() is not None  # killed while still booting: it was never sent work


def test_match_starts_its_worker_processes_before_reading_the_dataset(tmp_path, monkeypatch):
    from ditf_pipeline.pipeline import commands

    started = []
    monkeypatch.setattr(pool.WorkerPool, "__init__", lambda self, jobs, preload=(): started.append((jobs, preload)))
    monkeypatch.setattr(pool.WorkerPool, "close", lambda self: None)

    def dataset(*args):
        assert started, "the dataset was read before the worker processes were started"
        raise DitfError("stop here")

    monkeypatch.setattr(commands, "_dataset", dataset)
    with pytest.raises(DitfError, match="stop here"):
        commands.run_match(model="tiny-flux", dataset="spair", data_root=tmp_path, jobs=2, device="cpu")
    assert started and started[0][0] == 2 and "ditf_pipeline.match.kernels:warm_up" in started[0][1]


@pytest.mark.parametrize("settings", [dict(jobs=1), dict(jobs=2, fuse="dinov2"), dict(jobs=2, device="cuda")])
def test_no_early_workers_for_a_run_that_cannot_use_them(settings):
    from ditf_pipeline.core.settings import MatchSettings
    from ditf_pipeline.match.early import early_pool

    assert early_pool(MatchSettings(**settings)) is None


def test_early_workers_of_a_small_run_are_stopped_at_once():
    from ditf_pipeline.core.settings import MatchSettings
    from ditf_pipeline.match.early import early_pool
    from ditf_pipeline.match.predict import POOL_MIN_PAIRS, early_executor

    settings = MatchSettings(jobs=2, device="cpu")
    workers = early_pool(settings)
    process = workers._processes[0][1]
    assert early_executor(settings, POOL_MIN_PAIRS - 1, workers) is None
    assert process.poll() is not None  # killed while booting: too few pairs to repay it
