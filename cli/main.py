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
    from ditf_pipeline.match.pool import limit_malloc_arenas
    from ditf_pipeline.store.feature_store import close_writers

    limit_malloc_arenas()  # this process's memory: two glibc arenas (see `pool.MALLOC_ARENAS`)
    handle_sigterm()
    ok = False
    try:
        app()
        ok = True
    except SystemExit as exc:
        ok = exc.code in (0, None)
        raise
    finally:
        # the last writer of a store writes its consolidated metadata (a failed command only
        # if it wrote something: refused, it leaves the store as it was)
        close_writers(restore=ok)


if __name__ == "__main__":
    sys.exit(main())
