"""SIGKILL before every single store write of the setup (and a spread of later ones), then resume.

The hook sits at the lowest level every store write passes through (`store.faults`: a zarr
`WrapperStore` around every zarr store's `set`/`delete`, and the backends' own renames and
removals). For kill point N the
command runs with the hook armed at N: it leaves a marker and SIGKILLs itself right before its
N-th write. The next plain run of the same command must complete, and the final store (every
array, every attribute but timestamps: image index, feature arrays, prompt cache, predictions)
and the score JSON must equal those of an uninterrupted run.

Cost: each run is a fork of this test process (imports and the tiny model are built once, in
the parent; `load_adapter` hands the child that prebuilt, deterministic model; the parent's heap
is frozen for the garbage collector before each fork), so a kill point costs two short runs
instead of two interpreter starts.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import pytest

from ditf_pipeline.demo import make_spair_demo

from _store_snapshot import differences as _differences, file_differences, snapshot as _snapshot, without_store

pytestmark = pytest.mark.slow

#: pairs per match block in these runs: several blocks, so kills land between blocks too
MATCH_BLOCK = 1


def _fork(child) -> int:
    """Run `child()` in a forked process; its exit code, or -signal when a signal ended it."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Every extraction ends its prompt stage with a full `gc.collect()`: in a child of this big
    # process that walks (and copies-on-write) the whole inherited heap, more than the run's own work.
    # Frozen, the inherited objects are out of the collector's sight; the child's own are not.
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    gc.unfreeze()  # the parent's own garbage stays collectable
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Runner:
    def __init__(self, adapter, tmp: Path) -> None:
        self.adapter, self.tmp = adapter, tmp

    def __call__(self, args, kill_at: int | None = None, trace: Path | None = None) -> int:
        marker = self.tmp / "killed-at"
        marker.unlink(missing_ok=True)

        def child() -> None:
            import ditf_pipeline.models as models
            import ditf_pipeline.match.predict as predict
            from ditf_cli.main import run
            from ditf_pipeline.store import faults

            os.environ["DITF_KILL_MARKER"] = str(marker)
            counter = faults.arm(kill_at=kill_at, trace=bool(trace))
            predict.BLOCK = MATCH_BLOCK
            models.load_adapter = lambda *a, **k: self.adapter
            sys.stdout = sys.stderr = open(self.tmp / "child.log", "a")
            try:
                sys.argv = ["ditf", *map(str, args)]
                # the real entry point but for its last step (os._exit, which would skip this `finally`):
                # its closing write (consolidated metadata) is a kill point too
                sys.exit(run())
            finally:
                if trace:
                    trace.write_text(json.dumps(counter.trace))
                    (self.tmp / "modules.json").write_text(json.dumps(sorted(sys.modules)))

        code = _fork(child)
        if kill_at is not None and code == -9:
            assert marker.read_text() == str(kill_at)  # it was running, right before that write
        if trace:
            _import_in_parent(json.loads((self.tmp / "modules.json").read_text()))
        return code


def _import_in_parent(names: list[str]) -> None:
    """Import here what a traced run imported, so the forks that follow inherit it instead of
    each importing the CLI and the stages anew."""
    for name in names:
        if name not in sys.modules and name != "__main__":
            try:
                importlib.import_module(name)
            except ImportError:  # a module only its own package's import machinery can load
                pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    from ditf_pipeline.models import load_adapter

    torch.set_num_threads(1)  # no thread pool in the parent: forks stay safe
    tmp = tmp_path_factory.mktemp("kills")
    root = make_spair_demo(tmp / "SPair", categories=("cat",), pairs_per_category=3)
    adapter = load_adapter("tiny-flux", dtype="fp32", device="cpu")
    run = Runner(adapter, tmp)
    common = ["--model", "tiny-flux", "--data-root", root, "--k", "1"]
    extract = ["extract", *common, "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "--no-progress"]
    match = ["match", *common, "--variant", "adaln+cd", "--no-progress"]
    reference = tmp / "reference.zarr"
    assert run([*extract, "--store", reference], trace=tmp / "extract.trace") == 0, (tmp / "child.log").read_text()
    extracted = tmp / "extracted.zarr"
    shutil.copytree(reference, extracted)
    assert run([*match, "--store", reference], trace=tmp / "match.trace") == 0, (tmp / "child.log").read_text()
    score = tmp / "reference.json"
    assert run(["score", *common, "--store", reference, "--format", "json", "--out", score]) == 0
    return {
        "run": run, "tmp": tmp, "extract": extract, "match": match, "common": common, "extracted": extracted,
        "snapshot": _snapshot(reference), "score": json.loads(score.read_text())[0],
        # the store as extract leaves it (match adds predictions and records the detected channels)
        "extracted_snapshot": _snapshot(extracted), "reference": reference,
        "extract_trace": json.loads((tmp / "extract.trace").read_text()),
        "match_trace": json.loads((tmp / "match.trace").read_text()),
    }


def _kill_points(trace: list[str], first_data_write: str, spread: int) -> list[int]:
    """Every write up to the first one of per-item data, then every `spread`-th, and the last."""
    setup = next(i for i, what in enumerate(trace) if first_data_write in what)
    return sorted({*range(1, setup + 2), *range(setup + 2, len(trace) + 1, spread), len(trace)})


def test_extract_killed_before_any_setup_write_resumes_to_the_same_store(world):
    run, tmp = world["run"], world["tmp"]
    points = _kill_points(world["extract_trace"], "pre_adaln/c/", spread=7)
    assert len(points) > 40  # the setup really is covered write by write
    failures = []
    for n in points:
        store = tmp / f"extract-{n}.zarr"
        assert run([*world["extract"], "--store", store], kill_at=n) == -9, (n, (tmp / "child.log").read_text()[-2000:])
        code = run([*world["extract"], "--store", store])
        if code != 0:
            failures.append(f"kill at write {n} ({world['extract_trace'][n - 1]}): rerun exited {code}")
            continue
        bad = _differences(_snapshot(store), world["extracted_snapshot"])
        if bad:
            failures.append(f"kill at write {n} ({world['extract_trace'][n - 1]}): differs in {bad[:5]}")
        litter = file_differences(store, world["extracted"])
        if litter:
            failures.append(f"kill at write {n} ({world['extract_trace'][n - 1]}): other files {litter[:5]}")
        shutil.rmtree(store)
    assert not failures, "\n".join(failures) + "\n" + (tmp / "child.log").read_text()[-3000:]
    (tmp / "extract-kill-points.txt").write_text(str(len(points)))


def test_match_killed_before_any_write_resumes_to_the_same_predictions_and_score(world):
    run, tmp = world["run"], world["tmp"]
    trace = world["match_trace"]
    assert sum("/done/c/" in what for what in trace) > 1  # several blocks were committed one by one
    failures = []
    for n in range(1, len(trace) + 1):
        store = tmp / f"match-{n}.zarr"
        shutil.copytree(world["extracted"], store)
        assert run([*world["match"], "--store", store], kill_at=n) == -9, (n, (tmp / "child.log").read_text()[-2000:])
        code = run([*world["match"], "--store", store])
        score = tmp / f"match-{n}.json"
        if code != 0 or run(["score", *world["common"], "--store", store, "--format", "json", "--out", score]) != 0:
            failures.append(f"kill at write {n} ({trace[n - 1]}): rerun or score failed")
            continue
        bad = _differences(_snapshot(store), world["snapshot"])
        if bad:
            failures.append(f"kill at write {n} ({trace[n - 1]}): differs in {bad[:5]}")
        litter = file_differences(store, world["reference"])
        if litter:
            failures.append(f"kill at write {n} ({trace[n - 1]}): other files {litter[:5]}")
        if without_store(json.loads(score.read_text())[0]) != without_store(world["score"]):
            failures.append(f"kill at write {n} ({trace[n - 1]}): score differs")
        shutil.rmtree(store)
    assert not failures, "\n".join(failures) + "\n" + (tmp / "child.log").read_text()[-3000:]
