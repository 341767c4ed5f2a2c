"""`ditf match`, `ditf score`, `ditf run`, `ditf ablate`: every benchmark, through `stages`.

The dataset decides the task: keypoint pairs (SPair-71k, PF-Pascal, AP-10K: PCK), video
(DAVIS: label propagation, J&F) or homography (HPatches: corner accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    BatchImagesOpt, BatchSizeOpt, ChannelsOpt, CompileOpt, DEFAULT_STORE, DataRootOpt, DatasetOpt, DtypeOpt, EnsembleOpt, ImgSizeOpt, KOpt,
    ModelOpt, OffloadOpt, PrecisionOpt, PredictionsStoreOpt, ProgressOpt, PromptOpt, QuietOpt, ResampleOpt, ResizeOpt, RevisionOpt,
    SchedulerOpt, SeedOpt, ShardOpt, SplitOpt, StoreOpt, TOpt, TextDeviceOpt, VariantOpt, WeightsOpt, WorkersOpt, app,
    user_errors,
)

ProtocolOpt = Annotated[str, typer.Option(help="Pairs: dift (upsample to image size, <=) or geoaware (840 frame, 60x60, <).")]
SoftWindowOpt = Annotated[Optional[int], typer.Option(help="geoaware only: window soft-argmax width (11 or 15), temperature 0.02.")]
FuseOpt = Annotated[Optional[str], typer.Option(help="Pairs: concatenate another cached model per pair, e.g. dinov2-b14 (DiT part PCA'd over the pair).")]
PcaOpt = Annotated[int, typer.Option(help="With --fuse: PCA dimension of the DiT part over each pair (0: none).")]
AlphaOpt = Annotated[Optional[list[float]], typer.Option("--alpha", help="PCK alpha; repeat for several (default: the dataset's).")]
FormatOpt = Annotated[str, typer.Option("--format", help="table | json | csv | markdown")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Also write the result to this file.")]
PerPairOpt = Annotated[Optional[Path], typer.Option("--per-pair", help="Also write one row per pair (correct keypoints and PCK per alpha, with the settings) to FILE.csv, or FILE.parquet with pyarrow installed.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Recompute predictions stored with other settings.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (matching and propagation)")]
JobsOpt = Annotated[Optional[int], typer.Option("--jobs", help="Pairs on the CPU: N workers (a thread here and N-1 processes), one torch thread each (default: every core). Results are identical for any N.")]


def _emit(text: str, out: Path | None) -> None:
    typer.echo(text.rstrip("\n"))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            from ditf_pipeline.core.errors import DitfError

            raise DitfError(f"cannot write --out {out}: {exc.strerror or exc}") from None
        typer.echo(f"written to {out}")


def _render_all(results: list[dict], fmt: str) -> str:
    from ditf_pipeline.score.report import render

    if fmt == "json" and len(results) == 1:
        return render(results[0], "json")
    if fmt == "json":
        import json

        return json.dumps(results, indent=2) + "\n"
    texts = [render(r, fmt) for r in results]
    headers = {text.split("\n", 1)[0] for text in texts}
    if fmt == "csv" and len(headers) == 1:  # one frame: the context columns tell the variants apart
        return texts[0] + "".join(text.split("\n", 1)[1] for text in texts[1:])
    return "\n".join(texts)


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
    device: DeviceOpt = "auto",
    jobs: JobsOpt = None,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Predictions from cached features, written next to them (incremental; the DiT never runs).

    k and t default to the only key extracted for (dataset, model) in the store. A published
    (read-only) store needs --predictions-store: a local store the predictions go to.
    """
    from ditf_pipeline.pipeline import run_match

    run_match(model, dataset, data_root, split, store, k, t, variant, protocol, channels, soft_window, overwrite,
              progress and not quiet, workers, scheduler, fuse, pca_dim, device, jobs, shard,
              on_report=lambda report: typer.echo(report.line()), predictions_store=predictions_store)


@app.command()
@user_errors
def score(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: VariantOpt = None,
    protocol: ProtocolOpt = "dift",
    soft_window: SoftWindowOpt = None,
    fuse: FuseOpt = None,
    pca_dim: PcaOpt = 1280,
    alpha: AlphaOpt = None,
    fmt: FormatOpt = "table",
    out: OutOpt = None,
    per_pair: PerPairOpt = None,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Benchmark metrics from cached predictions: PCK per image / per point / category mean, J&F, or
    homography accuracy, all in percent. No GPU and no torch needed."""
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.pipeline import check_pair_arguments, run_score
    from ditf_pipeline.score.report import check_rows_path, write_rows

    if per_pair is not None:
        check_rows_path(per_pair)
    check_pair_arguments(variant, protocol, alpha, out)
    data = get_dataset(dataset, data_root, split)
    if per_pair is not None and data.task != "pairs":
        raise DitfError(f"--per-pair writes keypoint-pair rows; {data.name} is a {data.task} benchmark")
    scored = run_score(model, data, store=store, k=k, t=t, variants=variant, protocol=protocol, soft_window=soft_window,
                       fuse=fuse, pca_dim=pca_dim, alphas=alpha, predictions_store=predictions_store)
    _emit(_render_all(scored.results, fmt), out)
    if per_pair is not None:
        from ditf_pipeline.pipeline import reading_store
        from ditf_pipeline.score.evaluate import per_pair as per_pair_rows

        feature_store = reading_store(store, predictions_store)
        rows = [row for s in scored.settings
                for row in per_pair_rows(feature_store, data, model, scored.k, scored.t, s.prediction_name("pairs"), alpha)]
        write_rows(rows, per_pair)
        typer.echo(f"per-pair rows ({len(rows)}) written to {per_pair}")


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
    fmt: FormatOpt = "table",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """extract + match + score in one command (each stage resumes from the cache)."""
    from ditf_pipeline.pipeline import check_pair_arguments, run_extract, run_match, run_score

    progress = progress and not quiet
    check_pair_arguments(variant, protocol, alpha, out, device, workers)
    report = run_extract(model, dataset, data_root, split, store, k, t, img_size, ensemble_size, batch_size, seed,
                         prompt, weights, revision, dtype, device, progress, workers, scheduler, resize,
                         resample=resample, precision=precision, text_device=text_device, offload=offload,
                         batch_images=batch_images, compile=compile)
    typer.echo(report.line())
    results = []
    for key in report.keys:
        k_name, t_name = key.split("/")[-2:]
        key_k, key_t = [int(k_name[1:])], [int(t_name[1:])]
        matched = run_match(model, dataset, data_root, split, store, key_k, key_t, variant, protocol, channels,
                            soft_window, overwrite, progress, workers, scheduler, device=device,
                            on_report=lambda report: typer.echo(report.line()))
        results += run_score(model, matched.data, store=store, k=key_k, t=key_t, alphas=alpha,
                             settings=matched.settings).results
    _emit(_render_all(results, fmt), out)


@app.command()
@user_errors
def ablate(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: Annotated[
        Optional[list[str]],
        typer.Option("--variant", "-v", help="Variants to compare (default: every one the store supports)."),
    ] = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    aggregation: Annotated[Optional[str], typer.Option(help="per_point (paper Table 2/4) or per_image (Table 3); default: the benchmark's (AP-10K per image).")] = None,
    alpha: AlphaOpt = None,
    fmt: FormatOpt = "table",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    predictions_store: PredictionsStoreOpt = None,
) -> None:
    """Table 4 / Table 5 style comparison of feature variants on a pair benchmark, all from the cache.

    A published (read-only) store needs --predictions-store: a local store the predictions go to."""
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.pipeline import check_key, check_pair_arguments, run_match, run_score, stored_variants
    from ditf_pipeline.score.report import render_comparison
    from ditf_pipeline.store.feature_store import FeatureStore
    from ditf_pipeline.validate import check_choice

    check_pair_arguments(variant, protocol, alpha, out)
    if aggregation is not None:
        check_choice("aggregation", aggregation, ("per_point", "per_image"))
    data = get_dataset(dataset, data_root, split)
    if data.task != "pairs":
        raise DitfError(f"ablate compares PCK tables; for {data.name} run `ditf score --variant ...` per variant")
    if not variant:
        reader = FeatureStore(store, read_only=True)
        variant = stored_variants(reader, data, model, *check_key(reader, data, model, k, t))
    matched = run_match(model, data, store=store, k=k, t=t, variants=variant, protocol=protocol, channels=channels,
                        progress=progress, on_report=lambda report: typer.echo(report.line()),
                        predictions_store=predictions_store)
    results = run_score(model, data, store=store, k=[matched.k], t=[matched.t], alphas=alpha,
                        settings=matched.settings, predictions_store=predictions_store).results
    _emit(render_comparison(results, fmt, aggregation=aggregation or data.primary_aggregation), out)
