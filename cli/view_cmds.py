"""`ditf view`: the local web app over the feature store (optional extra `[view]`).

Parsing and printing only: `ditf_pipeline.pipeline.run_view` builds, binds and serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, QuietOpt, SplitOpt, app, user_errors


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
    from ditf_pipeline.pipeline import run_view

    run_view(store=store, data_root=data_root, split=split, host=host, port=port, allow_hosts=allow_host or (),
             uploads=uploads, no_uploads=no_uploads, uploads_max_mb=uploads_max_mb, on_url=typer.echo,
             note=lambda text: typer.echo(text, err=True))
