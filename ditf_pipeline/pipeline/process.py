"""What a `ditf` process does around its command: the memory arenas before, the store writers after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["command_process"]


@contextlib.contextmanager
def command_process() -> Iterator[None]:
    """Two glibc arenas for this process (see `match.pool.MALLOC_ARENAS`); on the way out, the last
    writer of each store writes its consolidated metadata: a command that ended normally also
    restores a copy a killed writer dropped; a failed one restores nothing (refused, it leaves
    the store as it was)."""
    from ..match.pool import limit_malloc_arenas
    from ..store.feature_store import close_writers

    limit_malloc_arenas()
    ok = False
    try:
        yield
        ok = True
    except SystemExit as exc:
        ok = exc.code in (0, None)
        raise
    finally:
        close_writers(restore=ok)
