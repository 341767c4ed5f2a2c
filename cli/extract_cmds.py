"""`ditf models`, `ditf extract`."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import (
    DEFAULT_STORE, BatchImagesOpt, BatchSizeOpt, CompileOpt, DataRootOpt, DatasetOpt, DeviceOpt, DtypeOpt, EnsembleOpt,
    ImgSizeOpt, KOpt, ModelOpt, OffloadOpt, PrecisionOpt, ProgressOpt, PromptOpt, QuietOpt, ResampleOpt, ResizeOpt,
    RevisionOpt, SchedulerOpt, SeedOpt, ShardOpt, SplitOpt, StoreOpt, TextDeviceOpt, TOpt, WeightsOpt, WorkersOpt, app,
    user_errors,
)


@app.command()
@user_errors
def models(quiet: QuietOpt = False) -> None:
    """List the models: weights (hub id), licence, blocks, width and default block k, timestep t, image size.

    Defaults marked "rule" are not the paper's: they follow a stated rule and were not tuned on
    real weights (`ditf analyze --match` over a k x t grid tunes them).
    """
    from ditf_pipeline.pipeline import list_models

    typer.echo(f"{'name':<18} {'blocks':>6} {'width':>6} {'k':>4} {'t':>5} {'img':>5}  {'k,t':<6} weights")
    for spec in list_models():
        typer.echo(
            f"{spec.name:<18} {spec.num_blocks:>6} {spec.hidden_size:>6} {spec.default_k:>4} {spec.default_t:>5} "
            f"{spec.img_size:>5}  {'rule' if spec.defaults_rule else 'paper':<6} "
            f"{spec.hub_id or 'built in (random, seeded)'}"
        )
        pad = " " * 19
        if spec.description:
            typer.echo(f"{pad}{spec.description}")
        if spec.license:
            typer.echo(f"{pad}licence: {spec.license}")
        if spec.defaults_rule:
            typer.echo(f"{pad}defaults: {spec.defaults_rule}")
    typer.echo("tune k and t (rule defaults): ditf analyze --model NAME --split SPLIT --k K1 --k K2 --t T1 --t T2 --match")


@app.command()
@user_errors
def extract(
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
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run the DiT once per image and cache raw pre-AdaLN features + AdaLN vectors.

    Resumable: rerunning skips images already complete. Writing into an existing key with
    different settings is refused.
    """
    from ditf_pipeline.core.settings import FeatureSettings, LoadSettings, RunSettings
    from ditf_pipeline.pipeline import run_extract

    report = run_extract(
        dataset=dataset, data_root=data_root, split=split, store=store, progress=progress and not quiet,
        features=FeatureSettings(model=model, k=k, t=t, img_size=img_size, resize=resize, resample=resample,
                                 ensemble_size=ensemble_size, seed=seed, prompt=prompt, precision=precision),
        run=RunSettings(device=device, batch_size=batch_size, batch_images=batch_images, compile=compile,
                        offload=offload, shard=shard, workers=workers, scheduler=scheduler),
        load=LoadSettings(weights=weights, revision=revision, dtype=dtype, text_device=text_device),
    )
    typer.echo(report.line())
