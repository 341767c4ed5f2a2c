"""Shared test setup: no hub access, ever (a hub id would otherwise cost 30 s of retries), one
thread pool per core across pytest-xdist workers, and a garbage collector that does not walk the
whole suite's heap on every `gc.collect()`."""

import gc
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _threads_per_xdist_worker() -> None:
    """Under pytest-xdist (`-n auto`), one torch/OpenMP thread pool per core in all, not per worker.

    Each worker is a process with its own pool sized to every core; two pools on two cores
    oversubscribe them and the tiny models gain nothing from the second thread. Set in the
    environment before torch is imported, so the subprocesses a test starts (CLI runs, dask
    workers) get the same count as the test that compares against them.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


_threads_per_xdist_worker()

_last_module: list[object] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """At the first test of each module: collect, then freeze what is still alive.

    Every extraction calls `gc.collect()` (the adapter frees its text encoders), and a full
    collection walks every tracked object: in this process that is torch, diffusers,
    transformers and every test module imported so far, on every call. Freezing
    moves the objects alive between modules (modules, classes, pytest's own state; the previous
    module's fixtures are already torn down) out of the collector's sight, so each collection
    walks only what the current module made. Frozen objects are still freed by reference
    counting; only cycles among them stay, and those are the long-lived imports.
    """
    module = getattr(item, "module", None)
    if module is not _last_module[0]:
        _last_module[0] = module
        gc.collect()
        gc.freeze()
