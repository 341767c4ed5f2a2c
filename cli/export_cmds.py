"""`ditf export`: one file per image of any cached variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, ChannelsOpt, KOpt, ModelOpt, NoFormatOpt, OneVariantOpt, QuietOpt, ReadStoreOpt, TOpt, app, one, user_errors,
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
    file_format: Annotated[str, typer.Option("--file-format", help="File type of each image's file: safetensors (metadata in the header) | npy (with a .json sidecar).")] = "safetensors",
    channels: ChannelsOpt = "auto",
    image: Annotated[Optional[list[str]], typer.Option("--image", help="Only this image key; repeat for several (default: all).")] = None,
    quiet: QuietOpt = False,
    fmt: NoFormatOpt = None,
) -> None:
    """Write each image's features of one variant to its own file: (C, h, w) float32 + grid and settings.

    k and t default to the model's key when stored, else the only key of (dataset, model).
    """
    from ditf_pipeline.pipeline import run_export
    from ditf_pipeline.pipeline.report import refuse_format

    refuse_format(fmt, "export", "the files' type with --file-format safetensors|npy")
    typer.echo(run_export(out=out, model=model, dataset=dataset, store=store, k=k, t=t, variant=one(variant, "--variant", "adaln+cd"), fmt=file_format,
                          channels=channels, images=image).line())
