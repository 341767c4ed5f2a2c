"""`ditf models`, `ditf extract`, `ditf demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    DEFAULT_STORE, DataRootOpt, DatasetOpt, KOpt, ModelOpt, ProgressOpt, SplitOpt, StoreOpt, TOpt, app, user_errors,
)

WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Spread the work over N local dask worker processes (one per GPU, pinned, when there are GPUs).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Spread the work over an existing dask cluster, e.g. tcp://HOST:8786 (store and data on shared paths).")]


def extract_options(
    model: str,
    dataset: str,
    data_root: Path,
    split: str | None,
    store: Path,
    k: list[int] | None,
    t: list[int] | None,
    img_size: int | None,
    ensemble_size: int,
    batch_size: int | None,
    seed: int,
    prompt: str,
    weights: str | None,
    revision: str | None,
    dtype: str,
    device: str,
    progress: bool,
    workers: int | None = None,
    scheduler: str | None = None,
):
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.extract import Extractor, ExtractSettings
    from ditf_pipeline.models import get_spec, load_adapter, resolve_device
    from ditf_pipeline.store import FeatureStore

    spec = get_spec(model)
    data = get_dataset(dataset, data_root, split)
    if dtype == "auto":
        dtype = "bf16" if resolve_device(device).type == "cuda" else "fp32"
    adapter = load_adapter(model, weights=weights, revision=revision, dtype=dtype, device=device)
    settings = ExtractSettings(
        ks=list(k or [spec.default_k]), ts=list(t or [spec.default_t]), img_size=img_size or spec.img_size,
        ensemble_size=ensemble_size, batch_size=batch_size, seed=seed, prompt=prompt,
    )
    if workers or scheduler:  # the same run with the images spread over dask workers
        from ditf_pipeline.distributed import AdapterArgs, extract_distributed, shared_client

        report = extract_distributed(shared_client(workers, scheduler), AdapterArgs(model, weights, revision, dtype, device),
                                     store, settings, data, progress=progress)
    else:
        extractor = Extractor(adapter, FeatureStore(store), settings)
        report = extractor.run(data, progress=progress)
    typer.echo(
        f"extract: {report.extracted} image(s) extracted, {report.skipped} already complete, "
        f"{report.seconds:.1f} s ({report.images_per_second:.2f} img/s) -> {report.store} "
        f"[{', '.join(report.keys)}]"
    )
    return report


@app.command()
@user_errors
def models() -> None:
    """List the models and their paper defaults (block k, timestep t, image size)."""
    from ditf_pipeline.models import get_spec, model_names

    typer.echo(f"{'name':<14} {'blocks':>6} {'width':>6} {'k':>4} {'t':>5} {'img':>5}  weights")
    for name in model_names():
        spec = get_spec(name)
        typer.echo(
            f"{spec.name:<14} {spec.num_blocks:>6} {spec.hidden_size:>6} {spec.default_k:>4} {spec.default_t:>5} "
            f"{spec.img_size:>5}  {spec.hub_id or 'built in (random, seeded)'}"
        )
        if spec.description:
            typer.echo(f"{'':<14} {spec.description}")


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
    img_size: Annotated[Optional[int], typer.Option(help="Long side in pixels (default: the model's).")] = None,
    ensemble_size: Annotated[int, typer.Option(help="Noise draws averaged per image (batched together).")] = 8,
    batch_size: Annotated[Optional[int], typer.Option(help="Split the ensemble into batches of this size.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed; noise is seeded per image and t.")] = 0,
    prompt: Annotated[str, typer.Option(help="template | captions:FILE | none")] = "template",
    weights: Annotated[Optional[str], typer.Option(help="Local diffusers pipeline folder or hub id overriding the model's.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32 (auto: bf16 on GPU, fp32 on CPU).")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    progress: ProgressOpt = True,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run the DiT once per image and cache raw pre-AdaLN features + AdaLN vectors.

    Resumable: rerunning skips images already complete. Writing into an existing key with
    different settings is refused.
    """
    extract_options(model, dataset, data_root, split, store, k, t, img_size, ensemble_size, batch_size, seed,
                    prompt, weights, revision, dtype, device, progress, workers, scheduler)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated dataset and the store.")] = Path("demo_out"),
    model: ModelOpt = "tiny-flux",
    progress: ProgressOpt = True,
) -> None:
    """Generate a small SPair-71k-layout dataset and run extract, match, score and the ablation on a tiny model."""
    from ditf_pipeline.demo import make_demo

    from .pairs_cmds import default_ablation_variants, match_options, score_results

    data_root = make_demo("spair", out / "SPair-demo", overwrite=True)
    typer.echo(f"demo: generated an SPair-71k-layout dataset at {data_root}")
    store = out / "ditf.zarr"
    report = extract_options(model, "spair", data_root, "test", store, None, None, None, 4, None, 0, "template", None,
                             None, "fp32", "auto", progress)
    from ditf_pipeline.report import render, render_comparison

    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    variants = default_ablation_variants(model, "spair", data_root, "test", store, [k], [t])
    data, feature_store, k, t, names = match_options(model, "spair", data_root, "test", store, [k], [t], variants,
                                                     "dift", "auto", None, False, progress)
    results = score_results(data, feature_store, model, k, t, names, None)
    typer.echo("")
    typer.echo(render(results[names.index("adaln+cd/dift")], "table").rstrip())
    typer.echo("")
    typer.echo("ablation (random tiny weights: the numbers show the pipeline works, not what DiTF reaches):")
    typer.echo(render_comparison(results, "table").rstrip())
    typer.echo(f"\ndemo: store at {store}; rerun any stage with --store {store} --data-root {data_root} --model {model}")
