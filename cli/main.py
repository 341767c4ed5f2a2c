"""The `ditf` command line: a thin typer layer over `ditf_pipeline`.

Each module here adds its commands to the one `app`; this module only wires them up.
"""

from __future__ import annotations

import sys

from . import analysis_cmds, baseline_cmds, doctor_cmds, extract_cmds, pairs_cmds, probe_cmds  # noqa: F401  (each registers its commands)
from . import demo_cmds, export_cmds, pack_cmds  # noqa: F401
from . import view_cmds  # noqa: F401,E402  (`ditf view`; FastAPI is imported only when it runs)
from .app import app, handle_sigterm


def main() -> None:
    """The `ditf` command: `run` it, then end the process at once (`_exit_now`)."""
    _exit_now(run())


def run() -> object:
    """The command in ``sys.argv`` from start to end, every write included; its exit code (an
    int, None for 0, or a message), as ``SystemExit`` carries it."""
    from ditf_pipeline.pipeline.process import command_process

    handle_sigterm()  # SIGTERM (SLURM's time limit) ends like Ctrl-C: resume hint, exit 143
    try:
        with command_process():  # memory arenas; the last writer of a store consolidates its metadata
            app()
    except SystemExit as done:  # typer ends every command this way, failed or not
        return done.code
    return 0


def _exit_now(code: object) -> None:
    """End the process without the interpreter's teardown, once everything was written.

    Why: tearing down torch, zarr, numba and ditf module by module costs ~1 s of CPU on the 2-core
    VM after every command (`python -c "import ditf_pipeline.match.predict"`: 2.5-3.0 s, the same
    ending in os._exit: 1.8-2.0 s), a fifth of a quick `ditf match`. Everything that must happen
    at exit still does: threads that are not daemons are joined, the exit handlers (logging's
    flush, temporary folders, zarr's loop) run, and both output streams are flushed, before
    ``os._exit``.
    """
    import atexit
    import os
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    # what the interpreter's own exit does first, in its order: join the threads that are not
    # daemons (and the thread pools that registered with threading), then the exit handlers
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1  # a closed pipe (| head): nothing more to say
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
