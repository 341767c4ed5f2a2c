"""`ditf pack`: chosen keys of a store into a new store ready to publish (HTTP(S), the Hugging Face Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, QuietOpt, ReadStoreOpt, app, quiet_note, user_errors


@app.command()
@user_errors
def pack(
    out: Annotated[Path, typer.Option("--out", help="New folder: the store (ditf.zarr), manifest.json and README.md "
                                                    "(the dataset card), to upload as it is.")],
    store: ReadStoreOpt = DEFAULT_STORE,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Only this dataset's keys (default: all).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only this model's keys (default: all).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Only keys of this block index.")] = None,
    t: Annotated[Optional[int], typer.Option("--t", help="Only keys of this timestep.")] = None,
    predictions: Annotated[bool, typer.Option(help="Copy the keys' predictions too.")] = True,
    license: Annotated[Optional[str], typer.Option("--license", help="The card's YAML license (a Hub licence id; "
                                                                       "default: the sources' own when they agree, else other).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Copy keys of a store into a self-contained store to publish: consolidated metadata, every chunk's
    checksum verified while copying, a manifest of keys and sizes, and a dataset card. Sizes go to
    stderr before copying."""
    from ditf_pipeline.pipeline import run_pack

    manifest = run_pack(store=store, out=out, dataset=dataset, model=model, k=k, t=t, predictions=predictions,
                        license=license, note=quiet_note(quiet))
    typer.echo(f"pack: {len(manifest['items'])} node(s), {manifest['bytes'] / 1e6:.1f} MB -> {out / manifest['store']}")
