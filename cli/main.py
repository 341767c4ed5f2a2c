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
    from ditf_pipeline.pipeline.process import command_process

    handle_sigterm()  # SIGTERM (SLURM's time limit) ends like Ctrl-C: resume hint, exit 143
    with command_process():  # memory arenas; the last writer of a store consolidates its metadata
        app()


if __name__ == "__main__":
    sys.exit(main())
