"""`ditf match`, `ditf score`, `ditf run`, `ditf ablate`: every benchmark, through `ditf_pipeline.pipeline`.

The dataset decides the task: keypoint pairs (SPair-71k, PF-Pascal, AP-10K: PCK), video
(DAVIS: label propagation, J&F) or homography (HPatches: corner accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, AggregationOpt, AlphaOpt, BatchImagesOpt, BatchSizeOpt, ChannelsOpt, CompileOpt, DataRootOpt,
    DatasetOpt, DeviceOpt, DtypeOpt, EnsembleOpt, FuseOpt, ImgSizeOpt, JobsOpt, KOpt, MatchDeviceOpt, ModelOpt, OffloadOpt, OutOpt,
    OverwriteOpt, PcaOpt, PrecisionOpt, PredictionsStoreOpt, ProgressOpt, PromptOpt, ProtocolOpt, QuietOpt, ReadStoreOpt, ResampleOpt,
    ResizeOpt, RevisionOpt, SchedulerOpt, SeedOpt, ShardOpt, SoftWindowOpt, SplitOpt, StoreOpt, TableFormatOpt,
    TextDeviceOpt, TOpt, VariantOpt, WeightsOpt, WorkersOpt, app, emit, quiet_note, user_errors,
)

PerPairOpt = Annotated[Optional[Path], typer.Option("--per-pair", help="Also write one row per pair (correct keypoints and PCK per alpha, with the settings) to FILE.csv, or FILE.parquet with pyarrow installed.")]


def _check_format(fmt: str) -> None:
    from ditf_pipeline.pipeline.report import check_output_format

    check_output_format(fmt)


def _render_all(results: list[dict], fmt: str) -> str:
    from ditf_pipeline.pipeline.report import render_results

    return render_results(results, fmt)


@app.command()
@user_errors
def match(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: VariantOpt = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    soft_window: SoftWindowOpt = None,
    fuse: FuseOpt = None,
    pca_dim: PcaOpt = 1280,
    overwrite: OverwriteOpt = False,
    device: MatchDeviceOpt = "auto",
    jobs: JobsOpt = None,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Predictions from cached features, written next to them (incremental; the DiT never runs).

    k and t default to the model's key when stored, else the only key extracted for (dataset, model).
    A published (read-only) store needs --predictions-store: a local store the predictions go to.
    """
    from ditf_pipeline.core.settings import MatchSettings
    from ditf_pipeline.pipeline import run_match

    settings = MatchSettings(protocol=protocol, channels=channels, soft_window=soft_window, fuse=fuse, pca_dim=pca_dim,
                             device=device, jobs=jobs, shard=shard)
    run_match(model=model, dataset=dataset, data_root=data_root, split=split, store=store, k=k, t=t, variants=variant,
              settings=settings, overwrite=overwrite, progress=progress and not quiet, workers=workers,
              scheduler=scheduler, on_report=lambda report: typer.echo(report.line()), predictions_store=predictions_store)


@app.command()
@user_errors
def score(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: ReadStoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: VariantOpt = None,
    protocol: ProtocolOpt = "dift",
    soft_window: SoftWindowOpt = None,
    fuse: FuseOpt = None,
    pca_dim: PcaOpt = 1280,
    alpha: AlphaOpt = None,
    fmt: TableFormatOpt = "table",
    out: OutOpt = None,
    per_pair: PerPairOpt = None,
    quiet: QuietOpt = False,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Benchmark metrics from cached predictions: PCK per image / per point / category mean, J&F, or
    homography accuracy, all in percent. No GPU and no torch needed."""
    from ditf_pipeline.pipeline import run_score
    from ditf_pipeline.pipeline.report import check_rows_path, write_rows

    _check_format(fmt)
    if per_pair is not None:
        check_rows_path(per_pair)
    scored = run_score(model=model, dataset=dataset, data_root=data_root, split=split, store=store, k=k, t=t,
                       variants=variant, protocol=protocol, soft_window=soft_window, fuse=fuse, pca_dim=pca_dim,
                       alphas=alpha, out=out, per_pair=per_pair is not None, predictions_store=predictions_store)
    text = _render_all(scored.results, fmt)
    if per_pair is not None:
        write_rows(scored.per_pair, per_pair)
    emit(text, out)
    if per_pair is not None:
        quiet_note(quiet)(f"per-pair rows ({len(scored.per_pair)}) written to {per_pair}")


@app.command()
@user_errors
def run(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    img_size: ImgSizeOpt = None,
    resize: ResizeOpt = None,
    resample: ResampleOpt = None,
    precision: PrecisionOpt = "default",
    ensemble_size: EnsembleOpt = None,
    batch_size: BatchSizeOpt = None,
    batch_images: BatchImagesOpt = None,
    compile: CompileOpt = "auto",
    seed: SeedOpt = 0,
    prompt: PromptOpt = None,
    weights: WeightsOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    text_device: TextDeviceOpt = None,
    offload: OffloadOpt = False,
    variant: VariantOpt = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    soft_window: SoftWindowOpt = None,
    alpha: AlphaOpt = None,
    fmt: TableFormatOpt = "table",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    jobs: JobsOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """extract + match + score in one command (each stage resumes from the cache).

    With --shard i/N this job extracts its share of the images and matches its share of the
    pairs; the scores print once every share is done (a shard that finds others missing says so
    on stderr and prints an empty result).
    """
    from ditf_pipeline.core.settings import FeatureSettings, LoadSettings, MatchSettings, RunSettings
    from ditf_pipeline.pipeline import run_all

    _check_format(fmt)
    notes = quiet_note(quiet)
    results = run_all(
        dataset=dataset, data_root=data_root, split=split, store=store, progress=progress and not quiet,
        features=FeatureSettings(model=model, k=k, t=t, img_size=img_size, resize=resize, resample=resample,
                                 ensemble_size=ensemble_size, seed=seed, prompt=prompt, precision=precision),
        run=RunSettings(device=device, batch_size=batch_size, batch_images=batch_images, compile=compile,
                        offload=offload, shard=shard, workers=workers, scheduler=scheduler, jobs=jobs),
        load=LoadSettings(weights=weights, revision=revision, dtype=dtype, text_device=text_device),
        variants=variant, match=MatchSettings(protocol=protocol, channels=channels, soft_window=soft_window),
        alphas=alpha, out=out, overwrite=overwrite,
        on_extract=lambda report: notes(report.line()), on_report=lambda report: notes(report.line()), on_note=notes,
    )
    emit(_render_all(results, fmt), out)


@app.command()
@user_errors
def ablate(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: ReadStoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: Annotated[
        Optional[list[str]],
        typer.Option("--variant", "-v", help="Variants to compare (default: every one the store supports)."),
    ] = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    aggregation: AggregationOpt = None,
    alpha: AlphaOpt = None,
    fmt: TableFormatOpt = "table",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Table 4 / Table 5 style comparison of feature variants on a pair benchmark, all from the cache.

    A published (read-only) store needs --predictions-store: a local store the predictions go to."""
    from ditf_pipeline.pipeline import run_ablate
    from ditf_pipeline.pipeline.report import render_comparison

    _check_format(fmt)
    notes = quiet_note(quiet)
    scored, aggregation = run_ablate(model=model, dataset=dataset, data_root=data_root, split=split, store=store, k=k,
                                     t=t, variants=variant, protocol=protocol, channels=channels, alphas=alpha,
                                     aggregation=aggregation, out=out, progress=progress and not quiet,
                                     on_report=lambda report: notes(report.line()),
                                     predictions_store=predictions_store)
    emit(render_comparison(scored.results, fmt, aggregation=aggregation), out)
