"""`ditf view`: build the explorer web app over a store, bind, and serve it until stopped.

Here rather than in the command so that the command line reaches the web app, the host guard,
the uploads folder and the socket only through the orchestration layer, as every other command
does. (`views` is something else: the figures of `ditf analyze` and `ditf show`.) FastAPI and
uvicorn, the optional `[view]` extra, are imported only when a view is started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..core.errors import DitfError
from .commands import DEFAULT_STORE

__all__ = ["LOCAL_HOSTS", "run_view", "uploads_folder"]

#: interfaces that serve this machine only: any other gets a warning that the store's data is exposed
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def uploads_folder(store: str | Path, uploads: Path | None, no_uploads: bool,
                   note: Callable[[str], None]) -> Path | None:
    """Where uploads go: `uploads`, else `<store>.uploads` next to a local store; none for a URL
    store (there is no folder beside an object store to write into, and the store itself stays read-only)."""
    from ..store.backends.locations import is_remote, store_location

    if no_uploads:
        return None
    if uploads is not None:
        return uploads
    if is_remote(str(store)):
        note("view: uploads are off for an object store (give a local folder with --uploads to turn them on)")
        return None
    local = Path(store_location(str(store))).resolve()
    return local.with_name(local.name + ".uploads")


def run_view(
    *,
    store: str | Path = DEFAULT_STORE,
    data_root: Path | None = None,
    split: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    allow_hosts: Iterable[str] = (),
    uploads: Path | None = None,
    no_uploads: bool = False,
    uploads_max_mb: int = 2048,
    on_url: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """Open the store read-only, bind `host:port` (0: a free port), then serve until interrupted.

    The socket is bound before `on_url` is called, so the URL handed out is the one actually
    bound (a taken port is a `DitfError` and no URL); the URL carries this run's token, which
    the page needs to upload.
    """
    try:
        from ..view.app import serve
        from ..view.server import bind, url_of
    except ImportError as exc:
        raise DitfError(f"`ditf view` needs the optional extra: pip install 'ditf[view]' ({exc.name} is missing)") from None
    from ..view.explorer import Explorer
    from ..view.guard import allowed_hosts, new_token
    from ..view.uploads import Uploads

    folder = uploads_folder(store, uploads, no_uploads, note)
    explorer = Explorer(store, data_root, split,
                        None if folder is None else Uploads(folder, max_bytes=uploads_max_mb * 2**20))
    sock = bind(host, port)
    if host not in LOCAL_HOSTS:
        note(f"view: WARNING: serving on {host}: anyone who can reach this port can read the store's data")
    token = new_token()
    on_url(f"{url_of(sock, host)}?token={token}")
    note(f"view: store {store}, read-only; open the URL above; Ctrl-C stops")
    serve(explorer, sock, token, allowed_hosts(host, allow_hosts))
