"""The worker processes of a CPU match, started before anything heavy is imported.

Why: a worker is a fresh interpreter that takes ~2.5 s of a core to import torch, ditf and the
compiled kernels on the 2-core VM, and the calling process itself spends ~3 s starting up
(importing torch, parsing the dataset's pair files, opening the store) before its first pair.
Started when matching begins, a worker would sit out a third of an SPair-size run (~9 s of one
core); started here, when `run_match` begins and before it imports torch (this module and
`pool` import neither torch nor ditf's stages), it boots on the other core during that start-up.

The decision here needs only the settings: several jobs, no ``--fuse``, a ``--device`` that
can be the CPU ("cpu", or "auto", which is the CPU unless CUDA is found). What only the rest of
the start-up knows (the number of pairs, whether "auto" found a GPU) is checked by
`predict.early_executor`, which closes the pool when it is not needed: its processes are
killed while still booting, having cost some CPU on the other core and no waiting.
"""

from __future__ import annotations

from ..core.settings import MatchSettings
from .pool import WorkerPool, default_jobs

#: what a match worker imports (and calls) while it waits for its work: the stage, and the
#: compiled CPU kernels loaded from numba's disk cache
WORKER_PRELOAD = ("ditf_pipeline.match.predict", "ditf_pipeline.match.kernels:warm_up")

#: the ``--device`` values that may mean the CPU
CPU_DEVICES = ("cpu", "auto")


def planned_jobs(settings: MatchSettings) -> int:
    """The job count a CPU run of `settings` asks for (``--jobs``, default: the usable cores)."""
    return max(1, int(settings.jobs)) if settings.jobs is not None else default_jobs()


def early_pool(settings: MatchSettings) -> WorkerPool | None:
    """A started `WorkerPool` when `settings` may run on several CPU workers, else None."""
    if settings.fuse or str(settings.device).strip().lower() not in CPU_DEVICES:
        return None
    try:
        jobs = planned_jobs(settings)
    except (TypeError, ValueError):
        return None  # a bad --jobs is refused by the stage itself, with its own message
    return WorkerPool(jobs, preload=WORKER_PRELOAD) if jobs > 1 else None
