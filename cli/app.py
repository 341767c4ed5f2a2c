"""The typer app, the error wrapper and the options every command shares.

Every command turns a `DitfError` into one line on stderr and exit code 1; heavy imports
(torch, diffusers) happen inside the commands that need them, so `ditf score` and `--help`
stay light.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditf_pipeline.errors import DitfError

# library chatter (e.g. "CLIPImageProcessor requires torchvision") is not for the user
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

app = typer.Typer(
    help="DiTF: Diffusion Transformer Features for visual correspondence.\n\n"
    "Stages: extract (DiT once per image -> Zarr cache) -> match (nearest neighbours from the cache) "
    "-> score (PCK tables, no GPU needed). `ditf demo` runs everything on built-in data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_STORE = "stores/ditf.zarr"  # a str: --store also takes URLs


def user_errors(fn):
    """Print a DitfError as one line and exit 1; leave real bugs their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DitfError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: completed images are kept; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


# ---- shared options ------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `ditf models`).")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset reader: spair, folder, ...")]
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Dataset root folder in the benchmark's own layout.")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Dataset split (SPair: test, val, trn; default test).")]
StoreOpt = Annotated[str, typer.Option("--store", "-s", help="Zarr feature store (created if missing): a path, or a URL "
                                       "(s3://bucket/prefix, gs://, az://, file://; credentials from the usual environment).")]
KOpt = Annotated[Optional[list[int]], typer.Option("--k", help="Block index k; repeat for several (default: the model's).")]
TOpt = Annotated[Optional[list[int]], typer.Option("--t", help="Timestep t in 0..999; repeat for several (default: the model's).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars with ETA.")]
