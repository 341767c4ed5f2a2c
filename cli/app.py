"""The typer app, the error wrapper and the options every command shares.

Every command turns a `DitfError` into one line on stderr and exit code 1; heavy imports
(torch, diffusers) happen inside the commands that need them, so `ditf score` and `--help`
stay light.
"""

from __future__ import annotations

import functools
import signal
import warnings
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
    rich_markup_mode=None,  # plain click help: flags without a `<bool>` metavar, brackets printed as written
    add_completion=False,
)

DEFAULT_STORE = "stores/ditf.zarr"  # a str: --store also takes URLs (the same as `ditf_pipeline.pipeline.DEFAULT_STORE`)


def note(text: str) -> None:
    """Progress and notes go to stderr: stdout carries only a command's result (tables, JSON, CSV)."""
    typer.echo(text, err=True)


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
            # the interrupt can land while zarr's sync() waits on its event loop: the abandoned
            # coroutines are collected at exit and would each print a RuntimeWarning after our line
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            typer.echo(f"{what}: completed images are kept; rerun the same command to resume", err=True)
            raise typer.Exit(code) from None

    return wrapper


# ---- shared options ------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `ditf models`).")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset reader: spair, pfpascal, ap10k, davis, hpatches, ade20k or folder (any folder of images).")]
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Dataset root folder in the benchmark's own layout.")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Dataset split (SPair: test, val, trn; default test).")]
_URL_HELP = "a path, or a URL (s3://bucket/prefix, gs://, az://, file://; credentials from the usual environment)"
StoreOpt = Annotated[str, typer.Option("--store", "-s", help=f"Zarr feature store (created if missing): {_URL_HELP}.")]
ReadStoreOpt = Annotated[str, typer.Option("--store", "-s", help=f"Zarr feature store to read (it must exist): {_URL_HELP}; "
                                           "or a published store: https://host/ditf.zarr, hf://datasets/ORG/NAME/ditf.zarr[@REV].")]
PredictionsStoreOpt = Annotated[Optional[str], typer.Option(
    "--predictions-store", help="Local store for the predictions (features still read from --store): "
                                "matching a published, read-only --store.")]
KOpt = Annotated[Optional[list[int]], typer.Option("--k", help="Block index k; repeat for several (default: the model's; reading commands: the model's key if stored, else the only one).")]
TOpt = Annotated[Optional[list[int]], typer.Option("--t", help="Timestep t in 0..999; repeat for several (default: as for --k).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress on stderr (a bar on a terminal; periodic lines with rate and ETA in a log).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors (no progress, no notes); results still print on stdout.")]
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
OneVariantOpt = Annotated[Optional[list[str]], typer.Option("--variant", "-v", help="Feature variant: raw, adaln, adaln+cd, adaln+cd-post, adaln-t, adaln-c (one; default adaln+cd).")]


def one(values: list | None, flag: str, default):
    """The value of an option that is repeatable on every command but takes one here.

    `--variant`, `--alpha`, `--k` and `--t` mean the same on every command (repeat for several);
    a command that uses one refuses a second instead of keeping the last silently.
    """
    if not values:
        return default
    if len(values) > 1:
        raise DitfError(f"this command takes one {flag}, got {len(values)}: {', '.join(map(str, values))}")
    return values[0]
ProtocolOpt = Annotated[str, typer.Option(help="Pairs: dift (upsample to image size, <=) or geoaware (840 frame, 60x60, <).")]
SoftWindowOpt = Annotated[Optional[int], typer.Option(help="geoaware only: window soft-argmax width (11 or 15), temperature 0.02.")]
FuseOpt = Annotated[Optional[str], typer.Option(help="Pairs: concatenate another cached model per pair, e.g. dinov2-b14 (DiT part PCA'd over the pair).")]
PcaOpt = Annotated[int, typer.Option(help="With --fuse (compare: fused rows): PCA dimension of the DiT part over each pair (0: none).")]
AlphaOpt = Annotated[Optional[list[float]], typer.Option("--alpha", help="PCK alpha; repeat for several (default: the dataset's).")]
AggregationOpt = Annotated[Optional[str], typer.Option(help="per_point (paper Table 2/4) or per_image (Table 3); default: the benchmark's (AP-10K per image).")]
TableFormatOpt = Annotated[str, typer.Option("--format", help="Format of the printed result: table | json | csv | markdown (json: one shape per command, docs/outputs.md).")]
# `--format` is the printed result's format on every command; one that prints none keeps the name
# hidden only to refuse it with the option it meant (show: --figure-format, export: --file-format)
NoFormatOpt = Annotated[Optional[str], typer.Option("--format", hidden=True, help="Not an option of this command (see --help).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Also write the result to this file.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Recompute predictions stored with other settings.")]
MatchDeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (matching and propagation)")]
JobsOpt = Annotated[Optional[int], typer.Option("--jobs", help="Pairs on the CPU: N workers (a thread here and N-1 processes), one torch thread each (default: every core). Results are identical for any N.")]
DpiOpt = Annotated[int, typer.Option(help="Resolution of PNG figures (dots per inch; 100 = the documented pixel sizes; 300 for print).")]


def emit(text: str, out: Path | None = None) -> None:
    """The result on stdout (and, with --out, in that file too; the note that says so on stderr)."""
    typer.echo(text.rstrip("\n"))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise DitfError(f"cannot write --out {out}: {exc.strerror or exc}") from None
        note(f"written to {out}")


def quiet_note(quiet: bool):
    """`note`, or nothing with --quiet."""
    return (lambda text: None) if quiet else note


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
