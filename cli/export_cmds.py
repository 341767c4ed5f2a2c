"""`ditf export`: one file per image of any cached variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, ChannelsOpt, KOpt, ModelOpt, StoreOpt, TOpt, app, user_errors


@app.command()
@user_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Folder for the files (image keys become sub-paths).")],
    model: ModelOpt = "flux",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name the images are stored under (spair, folder, ...).")] = "spair",
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: Annotated[str, typer.Option("--variant", "-v", help="Feature variant: raw, adaln, adaln+cd, adaln+cd-post, adaln-t, adaln-c.")] = "adaln+cd",
    fmt: Annotated[str, typer.Option("--format", help="safetensors (metadata in the header) | npy (with a .json sidecar)")] = "safetensors",
    channels: ChannelsOpt = "auto",
    image: Annotated[Optional[list[str]], typer.Option("--image", help="Only this image key; repeat for several (default: all).")] = None,
) -> None:
    """Write each image's features of one variant to its own file: (C, h, w) float32 + grid and settings."""
    from ditf_pipeline.match.export import export_features
    from ditf_pipeline.pipeline import single_key

    k_, t_ = single_key(k, t)
    typer.echo(export_features(store, dataset, model, out, k_, t_, variant, fmt, channels, image).line())
