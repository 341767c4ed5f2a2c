"""`ditf view`: the local web app over the feature store (optional extra `[view]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, QuietOpt, SplitOpt, app, user_errors


def _uploads_folder(store: str, uploads: Optional[Path], no_uploads: bool) -> Optional[Path]:
    """Where uploads go: --uploads, else `<store>.uploads` next to a local store; none for a URL store."""
    from ditf_pipeline.store.backends.locations import is_remote, store_location

    if no_uploads:
        return None
    if uploads is not None:
        return uploads
    if is_remote(store):
        typer.echo("view: uploads are off for an object store (give a local folder with --uploads to turn them on)", err=True)
        return None
    local = Path(store_location(store)).resolve()
    return local.with_name(local.name + ".uploads")


@app.command()
@user_errors
def view(
    store: Annotated[str, typer.Option("--store", "-s", help="Feature store to explore (opened read-only): a path or a URL (s3://bucket/prefix, ...).")] = DEFAULT_STORE,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Dataset root (pairs, keypoints and images); without it only key figures are shown.")] = None,
    split: SplitOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.", min=0, max=65535)] = 8765,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="Another Host name the browser may use for this server (repeatable); the bound address and localhost always work.")] = None,
    uploads: Annotated[Optional[Path], typer.Option(help="Writable folder for uploaded images and their features (default: <store>.uploads next to a local store).")] = None,
    no_uploads: Annotated[bool, typer.Option("--no-uploads", help="Disable uploading images (nothing is ever written).")] = False,
    uploads_max_mb: Annotated[int, typer.Option("--uploads-max-mb", help="Most MiB the uploads folder may hold; uploads beyond it are refused.", min=1)] = 2048,
    quiet: QuietOpt = False,  # accepted as on every command: the server's address is the result it prints
) -> None:
    """Explore correspondences in the browser, straight from the cache.

    Click a source point: the cosine heatmap and argmax of raw / adaln / adaln+cd (and fused)
    features on the target, with the ground truth; pairs sorted by stored PCK; key figures.
    The printed URL carries a per-run token: the page needs it to upload.
    """
    from ditf_pipeline.core.errors import DitfError

    try:
        from ditf_pipeline.view.app import serve
        from ditf_pipeline.view.server import bind, url_of
    except ImportError as exc:
        raise DitfError(f"`ditf view` needs the optional extra: pip install 'ditf[view]' ({exc.name} is missing)") from None
    from ditf_pipeline.view.explorer import Explorer
    from ditf_pipeline.view.guard import allowed_hosts, new_token
    from ditf_pipeline.view.uploads import Uploads

    folder = _uploads_folder(store, uploads, no_uploads)
    explorer = Explorer(store, data_root, split,
                        None if folder is None else Uploads(folder, max_bytes=uploads_max_mb * 2**20))
    sock = bind(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"view: WARNING: serving on {host}: anyone who can reach this port can read the store's data", err=True)
    token = new_token()
    typer.echo(f"{url_of(sock, host)}?token={token}")
    typer.echo(f"view: store {store}, read-only; open the URL above; Ctrl-C stops", err=True)
    serve(explorer, sock, token, allowed_hosts(host, allow_host or ()))
