"""`ditf match`, `ditf score`, `ditf run`, `ditf ablate`: the keypoint-pair benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, DataRootOpt, DatasetOpt, KOpt, ModelOpt, ProgressOpt, SplitOpt, StoreOpt, TOpt, app, user_errors,
)
from .extract_cmds import SchedulerOpt, WorkersOpt, extract_options

VariantOpt = Annotated[
    Optional[list[str]],
    typer.Option("--variant", "-v", help="Feature variant: raw, adaln, adaln+cd, adaln+cd-post, adaln-t, adaln-c "
                 "(repeat for several; default adaln+cd)."),
]
ProtocolOpt = Annotated[str, typer.Option(help="Matching/scoring protocol: dift (upsample to image size, <=) or geoaware (840 frame, 60x60, <).")]
ChannelsOpt = Annotated[str, typer.Option(help="Channels to discard for +cd variants: auto (100x-median rule on cached z), none, or e.g. 154,1446.")]
SoftWindowOpt = Annotated[Optional[int], typer.Option(help="geoaware only: window soft-argmax width (11 or 15), temperature 0.02.")]
AlphaOpt = Annotated[Optional[list[float]], typer.Option("--alpha", help="PCK alpha; repeat for several (default: the dataset's).")]
FormatOpt = Annotated[str, typer.Option("--format", help="table | json | csv | markdown")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Also write the result to this file.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Recompute predictions stored with other settings.")]


def _single_k_t(k: list[int] | None, t: list[int] | None) -> tuple[int | None, int | None]:
    from ditf_pipeline.errors import DitfError

    if (k and len(k) > 1) or (t and len(t) > 1):
        raise DitfError("match/score take one --k and one --t (extract accepts several)")
    return (k[0] if k else None), (t[0] if t else None)


def _emit(text: str, out: Path | None) -> None:
    typer.echo(text.rstrip("\n"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"written to {out}")


def match_options(model, dataset, data_root, split, store, k, t, variants, protocol, channels, soft_window, overwrite, progress,
                  workers=None, scheduler=None):
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.predict import MatchSettings, predict
    from ditf_pipeline.store import FeatureStore

    data = get_dataset(dataset, data_root, split)
    feature_store = FeatureStore(store)
    k, t = feature_store.find_feature_key(data.name, model, *_single_k_t(k, t))
    names = []
    for variant in variants or ["adaln+cd"]:
        settings = MatchSettings(variant=variant, protocol=protocol, channels=channels, soft_window=soft_window)
        if workers or scheduler:  # blocks of pairs spread over dask workers
            from ditf_pipeline.distributed import predict_distributed, shared_client

            report = predict_distributed(shared_client(workers, scheduler), feature_store, data, model, k, t, settings,
                                         overwrite=overwrite, progress=progress)
        else:
            report = predict(feature_store, data, model, k, t, settings, overwrite=overwrite, progress=progress)
        channel_note = f", discarded channels {report.channels}" if variant.startswith("adaln+cd") else ""
        typer.echo(
            f"match: {report.matched} pair(s) matched, {report.skipped} already done, {report.seconds:.1f} s"
            f"{channel_note} -> {report.key}"
        )
        names.append(settings.name)
    return data, feature_store, k, t, names


def score_results(data, feature_store, model, k, t, names, alphas):
    from ditf_pipeline.evaluate import score_pairs

    return [score_pairs(feature_store, data, model, k, t, name, alphas) for name in names]


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
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Nearest-neighbour predictions for every pair, from cached features (incremental).

    k and t default to the only key extracted for (dataset, model) in the store.
    """
    match_options(model, dataset, data_root, split, store, k, t, variant, protocol, channels, soft_window, overwrite, progress,
                  workers, scheduler)


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
    alpha: AlphaOpt = None,
    fmt: FormatOpt = "table",
    out: OutOpt = None,
) -> None:
    """PCK per image, per point and category mean from cached predictions (no GPU, no torch)."""
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.report import render
    from ditf_pipeline.store import FeatureStore

    data = get_dataset(dataset, data_root, split)
    feature_store = FeatureStore(store, read_only=True)
    k_, t_ = feature_store.find_feature_key(data.name, model, *_single_k_t(k, t))
    names = [_prediction_name(v, protocol, soft_window) for v in (variant or ["adaln+cd"])]
    results = score_results(data, feature_store, model, k_, t_, names, alpha)
    if fmt == "json" and len(results) == 1:
        _emit(render(results[0], "json"), out)
    else:
        _emit("\n".join(render(r, fmt) for r in results), out)


def _prediction_name(variant: str, protocol: str, soft_window: int | None) -> str:
    # same rule as ditf_pipeline.predict.MatchSettings.name, without importing torch
    protocol_key = protocol if not soft_window else f"{protocol}-soft{soft_window}"
    return f"{variant}/{protocol_key}"


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
    img_size: Annotated[Optional[int], typer.Option(help="Long side in pixels (default: the model's).")] = None,
    ensemble_size: Annotated[int, typer.Option(help="Noise draws averaged per image.")] = 8,
    batch_size: Annotated[Optional[int], typer.Option(help="Split the ensemble into batches of this size.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    prompt: Annotated[str, typer.Option(help="template | captions:FILE | none")] = "template",
    weights: Annotated[Optional[str], typer.Option(help="Local pipeline folder or hub id.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    dtype: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    variant: VariantOpt = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    soft_window: SoftWindowOpt = None,
    alpha: AlphaOpt = None,
    fmt: FormatOpt = "table",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """extract + match + score in one command (each stage resumes from the cache)."""
    from ditf_pipeline.report import render

    report = extract_options(model, dataset, data_root, split, store, k, t, img_size, ensemble_size, batch_size, seed,
                             prompt, weights, revision, dtype, device, progress, workers, scheduler)
    results = []
    for key in report.keys:
        _, _, k_name, t_name = key.split("/")[-4:]
        data, feature_store, k_, t_, names = match_options(
            model, dataset, data_root, split, store, [int(k_name[1:])], [int(t_name[1:])], variant, protocol,
            channels, soft_window, False, progress, workers, scheduler,
        )
        results += score_results(data, feature_store, model, k_, t_, names, alpha)
    _emit("\n".join(render(r, fmt) for r in results), out)


def default_ablation_variants(model, dataset, data_root, split, store, k, t) -> list[str]:
    """Every variant the stored vectors support (no c-only variant for PixArt, whose AdaLN sees t only)."""
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.store import FeatureStore

    name = get_dataset(dataset, data_root, split).name
    feature_store = FeatureStore(store, read_only=True)
    k_, t_ = feature_store.find_feature_key(name, model, *_single_k_t(k, t))
    stored = feature_store.open_features(name, model, k_, t_).modulation_names
    variants = ["raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c"]
    return [v for v in variants if not v.startswith("adaln-") or f"shift_{v[-1]}" in stored]


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
        typer.Option("--variant", "-v", help="Variants to compare (default: raw adaln adaln+cd adaln+cd-post adaln-t adaln-c)."),
    ] = None,
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    aggregation: Annotated[str, typer.Option(help="per_point (paper Table 2/4) or per_image (Table 3).")] = "per_point",
    alpha: AlphaOpt = None,
    fmt: FormatOpt = "table",
    out: OutOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Table 4 / Table 5 style comparison of feature variants, all from the cache."""
    from ditf_pipeline.report import render_comparison

    variants = variant or default_ablation_variants(model, dataset, data_root, split, store, k, t)
    data, feature_store, k_, t_, names = match_options(
        model, dataset, data_root, split, store, k, t, variants, protocol, channels, None, False, progress
    )
    results = score_results(data, feature_store, model, k_, t_, names, alpha)
    _emit(render_comparison(results, fmt, aggregation=aggregation), out)
