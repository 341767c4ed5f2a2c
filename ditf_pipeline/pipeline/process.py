"""What a `ditf` process does around its command: the memory arenas before, the store writers after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["command_process"]


@contextlib.contextmanager
def command_process() -> Iterator[None]:
    """Two glibc arenas for this process (see `match.pool.MALLOC_ARENAS`); on the way out, the last
    writer of each store writes its consolidated metadata, whatever the command raised."""
    from ..match.pool import limit_malloc_arenas
    from ..store.feature_store import close_writers

    limit_malloc_arenas()
    try:
        yield
    finally:
        close_writers()
