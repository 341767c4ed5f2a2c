"""Blocks of pairs matched on every core: one worker per job, each owning a span of blocks.

Why processes and not threads: a pair is a few millisecond-sized kernels plus Python glue
around them. In threads the glue holds the GIL, so two threads scale clearly less than two
processes; this pool comes close to two fully independent processes (`benchmarks/bench_predict.py
--ceiling`; figures in `benchmarks/results/bench_predict-threads-spair-cpu-2core-2026-11-30.json`
and `bench_predict-spair-pool-cpu-2core-2026-11-30.json`).

Why spans: neighbouring pairs share images (SPair's pairs are grouped by category), and each
worker keeps its own feature cache. Handing out blocks round robin would make every worker
compute nearly every image; instead worker i owns the i-th contiguous span of the blocks and
walks it front to back. A worker that runs out steals single blocks from the back of the span
with the most left, so a slow or busy core never holds up the end of the run.

The calling process hands out the blocks (one at a time per worker, over one pipe each) and
receives `(block start, predictions)` back; it alone writes to the store, so crash safety
stays what `predict` documents (a block is committed when it is written, a killed run loses
the blocks in flight). Pipes, not queues or shared locks: a dead parent is an EOF for its
workers (they stop before their next block), a dead worker an EOF for the parent (one error
line), and nothing is left behind to clean up.

Worker 0 is a thread of the calling process (ready at once, with everything imported; the
calling process only waits and writes otherwise), workers 1.. are fresh interpreters
(`python -c`, each takes ~2.5 s of a core to import torch and ditf and load the compiled
kernels) started before the caller's own start-up (`early.py`); each says when it has booted
and only then receives the work and its first block over its pipe, so worker 0 never waits
for a worker still booting, and a run too short to use one never does. Not multiprocessing's
"fork": the parent's threads (zarr's event loop) must not be forked. Not its "spawn" either: spawn re-imports the caller's main script in every worker, so
a script without an ``if __name__ == "__main__":`` guard would run its own top level again
there (an `--overwrite` included) before failing. These workers import only ditf, so a
script needs no such guard. Each runs in its own process group: a terminal's Ctrl-C reaches
`ditf` alone, which stops the workers by closing their pipes.

The module knows nothing of features or torch: `make_runner` (a picklable callable, built
in the parent and called once in each worker) returns the function that matches one block.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait

from ..core.errors import DitfError

BlockRunner = Callable[[Sequence], list]


def default_jobs() -> int:
    """The cores this process may run on (``--jobs`` default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Spans:
    """Which block each worker does next: worker i owns the i-th contiguous span of the blocks
    (sizes differ by at most one) and takes it front to back; once its span is empty it takes
    from the back of the span with the most left (work stealing)."""

    def __init__(self, n_blocks: int, workers: int) -> None:
        bounds = [round(i * n_blocks / workers) for i in range(workers + 1)]
        self.front, self.end = bounds[:-1], bounds[1:]

    def next(self, worker: int) -> int | None:
        if self.front[worker] < self.end[worker]:
            self.front[worker] += 1
            return self.front[worker] - 1
        victim = max(range(len(self.end)), key=lambda j: self.end[j] - self.front[j])
        if self.end[victim] <= self.front[victim]:
            return None
        self.end[victim] -= 1
        return self.end[victim]


#: what a worker process runs: SIGINT ignored (the parent stops it by closing the pipe), the
#: parent's module path, then `_worker` on the inherited pipe
_BOOTSTRAP = ("import signal, sys\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "from multiprocessing.connection import Connection\n"
              "conn = Connection(int(sys.argv[1]))\n"
              "try:\n"
              "    sys.path[:], preload = conn.recv()\n"
              "except (EOFError, OSError):\n"
              "    sys.exit(0)  # the parent is gone already\n"
              "from ditf_pipeline.match.pool import _preload, _ready, _worker\n"
              "_preload(preload)\n"
              "_ready(conn)\n"
              "_worker(conn)\n")

Work = tuple[Callable[[], BlockRunner], Sequence[tuple[int, Sequence]]]


def _preload(names: Sequence[str]) -> None:
    """Import each ``module`` (or import ``module`` and call its ``function`` for
    ``module:function``) before the work arrives: a worker boots while its parent is still
    starting up. A failure is left for the real import to report, with the worker's error path."""
    import importlib

    for name in names:
        module, _, function = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
        except Exception:  # noqa: BLE001 - reported by the work itself, which needs the same imports
            return


#: for the tests of a worker killed or interrupted with a block in flight: set, worker 0 starts
#: only once every worker process has its first block, and a worker process stops itself
#: (SIGSTOP) when that block arrives, so the test acts on it without racing
PAUSE_ENV = "DITF_MATCH_WORKER_PAUSE"


def _ready(conn: Connection) -> None:
    """Tell the parent this worker has booted: it sends the work only then, so that it never
    waits on a pipe that a booting worker does not read yet (`_serve`)."""
    with contextlib.suppress(OSError):
        conn.send(("ready", None, None))


def _worker(conn: Connection, work: Work | None = None) -> None:
    """A worker: receive the work (a process) or take it (the thread), then match the blocks
    whose indices arrive until None, or until the parent is gone (EOF on the pipe, or a broken
    pipe when sending)."""
    in_process = work is None  # a worker process (its work comes over the pipe), not worker 0
    try:
        if work is None:
            try:
                work = conn.recv()
            except (EOFError, OSError):
                return
        pause = in_process and bool(os.environ.get(PAUSE_ENV))
        make_runner, blocks = work
        run_block = make_runner()
        while True:
            try:
                index = conn.recv()
            except (EOFError, OSError):
                return
            if index is None:
                return
            if pause:
                pause = False
                os.kill(os.getpid(), signal.SIGSTOP)
            start, block = blocks[index]
            result = run_block(block)
            try:
                conn.send(("block", start, result))
            except OSError:
                return
    except DitfError as exc:
        message = ("error", "ditf", str(exc))
    except BaseException:
        message = ("error", "crash", traceback.format_exc())
    with contextlib.suppress(OSError):
        conn.send(message)


def _thread_worker(conn: Connection, work: Work) -> None:
    """Worker 0, in this process: `_worker`, then its end of the pipe closed (as a process's exit would)."""
    try:
        _worker(conn, work)
    finally:
        conn.close()


#: glibc malloc arenas of a worker process (and of `ditf`, `limit_malloc_arenas`): by default each
#: of zarr's decoding threads gets its own arena and the freed buffers of feature maps spread over
#: them; two arenas keep peak RSS lower at no cost in speed (`benchmarks/bench_predict.py`)
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """At most `MALLOC_ARENAS` glibc malloc arenas in this process, unless MALLOC_ARENA_MAX says
    otherwise (glibc reads that at start); nothing on other C libraries. `ditf` calls this."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def _start_process() -> tuple[Connection, subprocess.Popen]:
    """A worker in a fresh interpreter, and the parent's end of its pipe (the work is sent later)."""
    parent_end, child_end = multiprocessing.Pipe()
    env = {"MALLOC_ARENA_MAX": str(MALLOC_ARENAS), **os.environ}
    try:
        # its own process group: a terminal's Ctrl-C goes to `ditf` alone (even while the worker's
        # interpreter starts, before it could ignore SIGINT), which then closes the pipe
        process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(child_end.fileno())], env=env,
                                   pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, process_group=0)
    finally:
        child_end.close()  # its end lives in the worker only: the worker's exit is our EOF
    return parent_end, process


class WorkerPool:
    """`jobs` workers: a thread of this process (started by `run`) and `jobs - 1` worker
    processes, started at once so that they boot (import torch, ~1-3.5 s; and the `preload`
    names, see `_preload`) while the caller gets the work ready. `run` once; `close` always (or
    use it as a context manager)."""

    def __init__(self, jobs: int, preload: Sequence[str] = ()) -> None:
        self.jobs = max(1, jobs)
        self._processes: list[tuple[Connection, subprocess.Popen]] = []
        self._working: set[int] = set()  # pids of the processes that were sent work
        try:
            for _ in range(1, self.jobs):
                conn, process = _start_process()
                self._processes.append((conn, process))
                # this process's module path (the worker imports the same ditf) and what to import
                # before the work arrives (`_preload`): the worker boots now, not when `run` starts
                conn.send((list(sys.path), list(preload)))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes: EOF on their pipes (they stop before their next block),
        killed when one has not stopped 5 s later; one that was never sent work is killed at
        once (it is still importing, or waiting: there is nothing to lose)."""
        for conn, _ in self._processes:
            conn.close()
        for _, process in self._processes:
            if process.pid not in self._working:
                process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def run(self, blocks: Sequence[tuple[int, Sequence]], make_runner: Callable[[], BlockRunner]
            ) -> Iterator[tuple[int, list]]:
        """Yield (block start, predictions) as the workers finish blocks (in no fixed order).

        `blocks`: (start, pairs) per block, in pair order. An error in a worker is raised here
        (a `DitfError` with the worker's message), as is a worker that dies; the pool is closed
        when this ends, whichever way.
        """
        work: Work = (make_runner, blocks)
        jobs = max(1, min(self.jobs, len(blocks)))
        parent_end, thread_end = multiprocessing.Pipe()
        thread_started = False
        try:
            for conn, _ in self._processes[jobs - 1:]:  # more processes than blocks: not needed
                conn.close()
            thread = threading.Thread(target=_thread_worker, args=(thread_end, work), name="ditf-match-0", daemon=True)
            thread.start()
            thread_started = True
            conns = [parent_end, *(conn for conn, _ in self._processes[: jobs - 1])]
            workers = [thread, *(process for _, process in self._processes[: jobs - 1])]

            def send_work(i: int) -> None:
                """Worker i (a process) has booted: its work now, its first block next."""
                try:
                    self._working.add(workers[i].pid)
                    conns[i].send(work)
                except OSError:
                    raise DitfError(_stopped(i, workers[i])) from None

            yield from _serve(conns, workers, len(blocks), send_work)
        finally:
            parent_end.close()  # worker 0 (a daemon thread) sees it after its block in flight and ends
            if not thread_started:
                thread_end.close()
            self.close()


def _serve(conns: list[Connection], workers: list, n_blocks: int,
           send_work: Callable[[int], None]) -> Iterator[tuple[int, list]]:
    """Hand out block indices one at a time per worker and yield the results as they come.

    One at a time, so that at the end every block not yet started can still go to whichever
    worker is free (the next index goes out as soon as a result arrives). Worker 0 (this
    process's thread) starts at once; a worker process gets its work (`send_work`) and first
    block when it says it has booted (`_ready`). Sending the work earlier made this process
    wait on the pipe of a worker still importing torch (the work is ~1 MB of pairs, the pipe
    holds 64 kB) while worker 0 waited for its first block: 1.5-2 s of nothing on the 2-core VM.
    A worker that has not booted when the blocks run out is never sent any.
    """
    spans = Spans(n_blocks, len(conns))
    owner = {conn: i for i, conn in enumerate(conns)}
    busy: set[Connection] = set()  # workers with a block in flight
    booting = set(conns[1:])  # worker processes not ready yet

    def hand_out(i: int) -> None:
        """The worker's next block, or None once there is none (it then stops)."""
        index = spans.next(i)
        conns[i].send(index)
        if index is not None:
            busy.add(conns[i])

    hold_worker_0 = bool(os.environ.get(PAUSE_ENV)) and bool(booting)  # see PAUSE_ENV
    if not hold_worker_0:
        hand_out(0)
    while busy or hold_worker_0:  # worker 0 is busy until no block is left to start (it steals the others')
        for conn in wait([*busy, *booting]):
            i = owner[conn]
            try:
                kind, start, payload = conn.recv()
            except (EOFError, OSError):  # EOF, or a reset: it died with our message unread
                raise DitfError(_stopped(i, workers[i])) from None
            if kind == "error":
                if start == "ditf":
                    raise DitfError(payload)
                raise RuntimeError(f"match worker {i} failed:\n{payload}")
            if kind == "ready":
                booting.discard(conn)
                send_work(i)
                hand_out(i)
                if hold_worker_0 and not booting:
                    hold_worker_0 = False
                    hand_out(0)
                continue
            busy.discard(conn)
            hand_out(i)
            yield start, payload


def _stopped(i: int, worker) -> str:
    """The error line for a worker gone before its blocks were done (killed, out of memory, or
    failed to start)."""
    if isinstance(worker, threading.Thread):
        return f"match worker {i} (a thread of this process) stopped before its blocks were done"
    try:
        code = worker.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return (f"match worker {i} stopped before its blocks were done ({cause}); the blocks already written are "
            "kept: rerun the same command to resume, or pass --jobs 1")
