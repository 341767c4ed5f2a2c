"""`ditf analyze` (massive activations, from the cache) and `ditf show` (correspondences as figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, ChannelsOpt, DataRootOpt, DatasetOpt, DpiOpt, KOpt, ModelOpt, NoFormatOpt, OneVariantOpt, ProgressOpt,
    QuietOpt, ReadStoreOpt, SplitOpt, TOpt, app, one, quiet_note, user_errors,
)

ProtocolOpt = Annotated[str, typer.Option(help="Matching/scoring protocol: dift or geoaware (show: also geoaware-softN predictions).")]


@app.command()
@user_errors
def analyze(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: ReadStoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    sample: Annotated[int, typer.Option(help="Images per key for the statistics (the first complete ones; 0 = all).")] = 32,
    ratio: Annotated[float, typer.Option(help="Massive if mean |z| over tokens exceeds this x the median channel.")] = 100.0,
    write: Annotated[bool, typer.Option("--write/--no-write", help="Store the detected set as the key's massive_channels (read by --channels auto); without it the store is left unchanged.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the figures (see --figure-format).")] = True,
    pca_images: Annotated[int, typer.Option(help="Images in the PCA-to-RGB figure.")] = 4,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", "-v", help="Predictions scored for the k x t PCK grid (one; default adaln+cd).")] = None,
    protocol: ProtocolOpt = "dift",
    alpha: Annotated[Optional[list[float]], typer.Option("--alpha", help="PCK alpha of the k x t grid (one; default 0.1).")] = None,
    aggregation: Annotated[str, typer.Option(help="per_point or per_image for the grid.")] = "per_point",
    match: Annotated[bool, typer.Option("--match/--no-match", help="Compute missing grid predictions from the cache (channels auto; writes predictions into the store).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and the figures.")] = Path("analysis"),
    fmt: Annotated[str, typer.Option("--format", help="Format of the printed result: table | json (the JSON file is always written in --out).")] = "table",
    figure_format: Annotated[str, typer.Option("--figure-format", help="png | pdf | svg (pdf and svg: vector, for papers).")] = "png",
    dpi: DpiOpt = 100,
    progress: ProgressOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Massive activations from the cache (paper Table 1, Figures 4, 5, 12); no DiT runs.

    Per (k, t): channels ranked by mean |activation|, the 100x-median massive channels and their
    AdaLN gate ranks, the same after AdaLN and channel discard; PNG figures and a JSON in --out.
    """
    from ditf_pipeline.pipeline import run_analyze
    from ditf_pipeline.pipeline.report import check_output_format

    check_output_format(fmt, ("table", "json"))
    analyzed = run_analyze(model=model, dataset=dataset, data_root=data_root, split=split, store=store, k=k, t=t,
                           sample=sample, ratio=ratio, write=write, plots=plots, pca_images=pca_images,
                           variant=one(variant, "--variant", "adaln+cd"), protocol=protocol,
                           alpha=one(alpha, "--alpha", 0.1), aggregation=aggregation, match=match,
                           out=out, progress=progress and not quiet, figure_format=figure_format, dpi=dpi)
    if fmt == "json":
        typer.echo(json.dumps(analyzed.report, indent=2))
    else:
        typer.echo("\n\n".join(analyzed.tables))
    notes = quiet_note(quiet)
    for path in analyzed.written:
        notes(f"analyze: wrote {path}")


@app.command()
@user_errors
def show(
    pair: Annotated[Optional[list[str]], typer.Option("--pair", "-p", help="Pair id, its leading number (1 = 000001-...) or a unique prefix; repeat for several.")] = None,
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: ReadStoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: OneVariantOpt = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    alpha: Annotated[Optional[list[float]], typer.Option("--alpha", help="Threshold for correct (circle) vs wrong (cross) (one; default 0.1).")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="Show nearest-neighbour matches of a grid of source points (over the source box when annotated) instead, from cached features.")] = False,
    grid: Annotated[int, typer.Option(help="--dense: grid of N x N source points.")] = 12,
    out: Annotated[Path, typer.Option(help="Figure file to write (.png, .pdf or .svg).")] = Path("show.png"),
    figure_format: Annotated[Optional[str], typer.Option("--figure-format", help="png | pdf | svg: replaces the ending of --out (default: --out's ending).")] = None,
    dpi: DpiOpt = 100,
    quiet: QuietOpt = False,
    fmt: NoFormatOpt = None,
) -> None:
    """Draw pairs side by side: predicted vs ground-truth keypoints, with the alpha x bbox radius
    around each ground truth (or --dense matches), as PNG, PDF or SVG."""
    from ditf_pipeline.pipeline import run_show
    from ditf_pipeline.pipeline.report import refuse_format

    refuse_format(fmt, "show", "a figure's file type with --figure-format png|pdf|svg")
    shown = run_show(pairs=pair, model=model, dataset=dataset, data_root=data_root, split=split, store=store, k=k, t=t,
                     variant=one(variant, "--variant", "adaln+cd"), protocol=protocol, channels=channels,
                     alpha=one(alpha, "--alpha", 0.1), dense=dense, grid=grid,
                     out=out, figure_format=figure_format, dpi=dpi)
    if shown.summary is not None:
        typer.echo(f"show: {shown.summary}")
    quiet_note(quiet)(f"show: wrote {shown.path}")
