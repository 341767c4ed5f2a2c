"""`ditf export`: one file per image of any cached variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, ChannelsOpt, KOpt, ModelOpt, OneVariantOpt, QuietOpt, ReadStoreOpt, TOpt, app, one, user_errors,
)


@app.command()
@user_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Folder for the files (image keys become sub-paths).")],
    model: ModelOpt = "flux",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name the images are stored under (spair, folder, ...).")] = "spair",
    store: ReadStoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: OneVariantOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="safetensors (metadata in the header) | npy (with a .json sidecar)")] = "safetensors",
    channels: ChannelsOpt = "auto",
    image: Annotated[Optional[list[str]], typer.Option("--image", help="Only this image key; repeat for several (default: all).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Write each image's features of one variant to its own file: (C, h, w) float32 + grid and settings.

    k and t default to the model's key when stored, else the only key of (dataset, model).
    """
    from ditf_pipeline.pipeline import run_export

    typer.echo(run_export(out=out, model=model, dataset=dataset, store=store, k=k, t=t, variant=one(variant, "--variant", "adaln+cd"), fmt=fmt,
                          channels=channels, images=image).line())
