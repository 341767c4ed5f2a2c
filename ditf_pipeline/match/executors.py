"""Executors of a `plan.MatchPlan`: its pending blocks predicted in this thread, or in a pool of
worker processes; this process commits every block (`distributed.runners.DaskExecutor` is the
third executor: its workers commit their own blocks).

An executor is anything with ``run(plan, progress) -> pairs matched``, ``workers`` (how many
matched, read after `run`) and ``runs_fusion`` (whether ``--fuse`` can run in it: the fusion
partner's cache lives in this process). Each is a context manager: the pool's processes start
when it is made (they boot while the plan is made) and stop when it closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ..core.progress import progress as progress_display
from .plan import MatchPlan
from .pool import WorkerPool
from .threads import one_intra_op_thread


def run_blocks(block_starts: Sequence[int], run_block: Callable[[int], list]) -> Iterator[tuple[int, list]]:
    """Yield (block_start, predictions) block after block, with torch on one intra-op thread."""
    with one_intra_op_thread():
        for start in block_starts:
            yield start, run_block(start)


class Executor(Protocol):
    """Runs the pending blocks of a plan; see the module's docstring."""

    workers: int  # how many matched (read after `run`)
    runs_fusion: bool  # whether a ``--fuse`` plan (blocks only this process can run) runs in it

    def run(self, plan: MatchPlan, progress: bool = True) -> int:
        """Predict and commit every pending block of `plan`; the pairs matched."""
        ...


class InThreadExecutor:
    """Every block in the calling thread (torch on one intra-op thread), one after the other."""

    runs_fusion = True

    def __init__(self) -> None:
        self.workers = 1

    def __enter__(self) -> "InThreadExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, plan: MatchPlan, progress: bool = True) -> int:
        matched = 0
        with progress_display(plan.n_todo, f"match {plan.settings.name}", "pair", enabled=progress) as bar:
            run_block = plan.local_runner(bar.update)
            finished = run_blocks(plan.todo, lambda start: run_block(plan.block_pairs(start)))
            with contextlib.closing(finished):  # the caller's intra-op setting back, even on an error
                for start, out in finished:
                    plan.predictions.write(start, out)
                    matched += len(out)
        return matched


class WorkerPoolExecutor:
    """The blocks spread over the workers of `pool` (`pool.WorkerPool`: this thread's worker and
    jobs - 1 processes, started when the pool was made). A plan with one pending block or fewer than `min_pairs` pending
    pairs runs in this thread instead (starting workers costs more than they would save then),
    and so does one whose blocks can only run here."""

    runs_fusion = True  # a --fuse plan has no worker_runner: it runs in this thread

    def __init__(self, pool: WorkerPool, min_pairs: int) -> None:
        self.jobs, self.min_pairs = pool.jobs, min_pairs
        self.workers = 1
        self._pool = pool

    def __enter__(self) -> "WorkerPoolExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.close()

    def run(self, plan: MatchPlan, progress: bool = True) -> int:
        n_todo = plan.n_todo
        if plan.worker_runner is None or len(plan.todo) < 2 or n_todo < self.min_pairs:
            self._pool.close()  # unused: its processes stop now rather than share the cores
            return InThreadExecutor().run(plan, progress)
        matched = 0
        self.workers = min(self.jobs, len(plan.todo))
        with progress_display(n_todo, f"match {plan.settings.name}", "pair", enabled=progress) as bar:
            finished = self._pool.run(plan.blocks(), plan.worker_runner)
            with contextlib.closing(finished):  # the workers stopped, even on an error here
                for start, out in finished:
                    plan.predictions.write(start, out)  # this process alone writes
                    matched += len(out)
                    bar.update(len(out))
        return matched
