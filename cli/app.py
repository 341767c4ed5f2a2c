"""The typer app, the error wrapper and the options every command shares.

Every command turns a `DitfError` into one line on stderr and exit code 1; heavy imports
(torch, diffusers) happen inside the commands that need them, so `ditf score` and `--help`
stay light.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditf_pipeline.core.errors import DitfError

app = typer.Typer(
    help="DiTF: Diffusion Transformer Features for visual correspondence.\n\n"
    "Stages: extract (DiT once per image -> Zarr cache) -> match (nearest neighbours from the cache) "
    "-> score (PCK tables, no GPU needed). `ditf demo` runs everything on built-in data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_STORE = "stores/ditf.zarr"  # a str: --store also takes URLs


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill` and SLURM at its time limit send), handled as Ctrl-C is: the stores
    are closed as usual, the user learns how to resume, and the exit code is 128 + 15."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in this (main) thread; `ditf`'s entry point calls it."""
    signal.signal(signal.SIGTERM, _terminated)


def user_errors(fn):
    """Print a DitfError as one line and exit 1; leave real bugs their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DitfError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            typer.echo(f"{what}: completed images are kept; rerun the same command to resume", err=True)
            raise typer.Exit(code) from None

    return wrapper


# ---- shared options ------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `ditf models`).")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset reader: spair, folder, ...")]
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Dataset root folder in the benchmark's own layout.")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Dataset split (SPair: test, val, trn; default test).")]
StoreOpt = Annotated[str, typer.Option("--store", "-s", help="Zarr feature store (created if missing): a path, or a URL "
                                       "(s3://bucket/prefix, gs://, az://, file://; credentials from the usual environment; "
                                       "a published store to read: https://host/ditf.zarr or hf://datasets/ORG/NAME/ditf.zarr[@REV]).")]
PredictionsStoreOpt = Annotated[Optional[str], typer.Option(
    "--predictions-store", help="Local store for the predictions (features still read from --store): "
                                "matching a published, read-only --store.")]
KOpt = Annotated[Optional[list[int]], typer.Option("--k", help="Block index k; repeat for several (default: the model's; reading commands: the model's key if stored, else the only one).")]
TOpt = Annotated[Optional[list[int]], typer.Option("--t", help="Timestep t in 0..999; repeat for several (default: as for --k).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress (a bar on a terminal; periodic lines with rate and ETA in a log).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output at all (same as --no-progress); results and errors still print.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Spread the work over N local dask worker processes (one per GPU, pinned, when there are GPUs).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Spread the work over an existing dask cluster, e.g. tcp://HOST:8786 (store and data on shared paths).")]

# extract settings (`ditf extract`, `ditf run`)
ResampleOpt = Annotated[Optional[str], typer.Option(
    help="pil-bicubic (SPair script) | cv2-bilinear (DAVIS script: cv2.imread BGR, cv2.resize INTER_LINEAR); "
         "default: the benchmark's.")]
PrecisionOpt = Annotated[str, typer.Option(
    help="default (DiT in --dtype, fp32 ensemble mean, fp32 matching of fp16-stored features) | paper (the "
         "authors' cast points: bf16 DiT, bf16 means, variant in bf16, fp16 upsampling and cosine).")]
ShardOpt = Annotated[Optional[str], typer.Option(
    "--shard", help="i/N: only this share of the images (extract) or pair blocks (match), for job arrays, e.g. "
                    "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; shards may run at once; together they equal one run.")]
TextDeviceOpt = Annotated[Optional[str], typer.Option(help="Where the text encoders run (cpu | cuda | cuda:N; default: --device). They are freed before the DiT runs; prompts are cached in the store.")]
OffloadOpt = Annotated[bool, typer.Option("--offload/--no-offload", help="Keep the DiT's blocks in CPU memory and move one at a time to the GPU (for GPUs smaller than the blocks up to k).")]
ImgSizeOpt = Annotated[Optional[int], typer.Option(help="Target size in pixels of the --resize side, at least the model's patch stride; sides are rounded to multiples of it (default: the benchmark's for Flux, else the model's).")]
ResizeOpt = Annotated[Optional[str], typer.Option(help="Side set to --img-size: long (SPair script) or short (DAVIS script; long side floored to /32).")]
EnsembleOpt = Annotated[Optional[int], typer.Option(help="Noise draws averaged per image, batched together (default 8; DAVIS 1).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Split the ensemble into batches of this size.")]
BatchImagesOpt = Annotated[Optional[int], typer.Option(
    "--batch-images", help="Images of the same token grid per DiT forward (rows = images x ensemble batch); each image's "
                           "noise stays seeded by its own key (default: 4 on CUDA, 1 on CPU or with --batch-size / --offload).")]
CompileOpt = Annotated[str, typer.Option(
    "--compile", help="auto | on | off: torch.compile the DiT blocks that run, one block at a time (auto: on for CUDA "
                      "without --offload, off on CPU). Recorded in the key's provenance; features equal eager within "
                      "float tolerance.")]
SeedOpt = Annotated[int, typer.Option(help="Base seed; noise is seeded per image and t.")]
PromptOpt = Annotated[Optional[str], typer.Option(help="template (\"a photo of a {category}\", default) | captions:FILE | text:STRING | none")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Local diffusers pipeline folder or hub id overriding the model's.")]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]
DtypeOpt = Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32 (auto: bf16 on GPU, fp32 on CPU).")]

# match / score settings
VariantOpt = Annotated[
    Optional[list[str]],
    typer.Option("--variant", "-v", help="Feature variant: raw, adaln, adaln+cd, adaln+cd-post, adaln-t, adaln-c "
                 "(repeat for several; default adaln+cd, raw for models without AdaLN)."),
]
ChannelsOpt = Annotated[str, typer.Option(help="Channels to discard for +cd variants: auto (stored set or 100x-median rule on cached z), none, or e.g. 154,1446.")]


def _print_version(value: bool) -> None:
    if value:
        from ditf_pipeline import __version__

        typer.echo(f"ditf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the ditf version and exit.")] = False,
) -> None:
    """DiTF: Diffusion Transformer Features for visual correspondence."""
