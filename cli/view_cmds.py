"""`ditf view`: the local web app over the feature store (optional extra `[view]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, SplitOpt, app, user_errors


@app.command()
@user_errors
def view(
    store: Annotated[str, typer.Option("--store", "-s", help="Feature store to explore (opened read-only): a path or a URL.")] = DEFAULT_STORE,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Dataset root (pairs, keypoints and images); without it only key figures are shown.")] = None,
    split: SplitOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8765,
    uploads: Annotated[Optional[Path], typer.Option(help="Writable folder for uploaded images and their features (default: <store>.uploads next to the store).")] = None,
    no_uploads: Annotated[bool, typer.Option("--no-uploads", help="Disable uploading images (nothing is ever written).")] = False,
) -> None:
    """Explore correspondences in the browser, straight from the cache.

    Click a source point: the cosine heatmap and argmax of raw / adaln / adaln+cd (and fused)
    features on the target, with the ground truth; pairs sorted by stored PCK; key figures.
    """
    from ditf_pipeline.core.errors import DitfError

    try:
        from ditf_pipeline.view.app import serve
    except ImportError as exc:
        raise DitfError(f"`ditf view` needs the optional extra: pip install 'ditf[view]' ({exc.name} is missing)") from None
    from ditf_pipeline.store.feature_store import local_beside
    from ditf_pipeline.view.explorer import Explorer

    folder = None if no_uploads else (uploads or local_beside(store, ".uploads", replace_suffix=False))
    explorer = Explorer(store, data_root, split, folder)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"view: WARNING: serving on {host}: anyone who can reach this port can read the store's data", err=True)
    typer.echo(f"view: http://{'[' + host + ']' if ':' in host else host}:{port}/  (store {store}, read-only; Ctrl-C stops)")
    serve(explorer, host, port)
