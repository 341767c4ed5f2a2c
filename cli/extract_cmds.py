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
    store: str | Path,
    k: list[int] | None = None,
    t: list[int] | None = None,
    img_size: int | None = None,
    ensemble_size: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    weights: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    resize: str | None = None,
):
    """Run the extract stage; unset settings come from the benchmark's and the model's defaults."""
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.extract import Extractor, default_settings
    from ditf_pipeline.models import get_spec, load_adapter, resolve_device
    from ditf_pipeline.store import FeatureStore

    spec = get_spec(model)
    data = get_dataset(dataset, data_root, split)
    if dtype == "auto":
        dtype = "bf16" if resolve_device(device).type == "cuda" else "fp32"
    settings = default_settings(spec, data, ks=k, ts=t, img_size=img_size, ensemble_size=ensemble_size,
                                batch_size=batch_size, seed=seed, prompt=prompt, resize=resize)
    if workers or scheduler:  # the same run with the images spread over dask workers
        from ditf_pipeline.distributed import AdapterArgs, extract_distributed, shared_client

        report = extract_distributed(shared_client(workers, scheduler), AdapterArgs(model, weights, revision, dtype, device),
                                     store, settings, data, progress=progress)
    else:
        adapter = load_adapter(model, weights=weights, revision=revision, dtype=dtype, device=device)
        report = Extractor(adapter, FeatureStore(store), settings).run(data, progress=progress)
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
    img_size: Annotated[Optional[int], typer.Option(help="Target size in pixels of the --resize side (default: the benchmark's for Flux, else the model's).")] = None,
    resize: Annotated[Optional[str], typer.Option(help="Side set to --img-size: long (SPair script) or short (DAVIS script; long side floored to /32).")] = None,
    ensemble_size: Annotated[Optional[int], typer.Option(help="Noise draws averaged per image, batched together (default 8; DAVIS 1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Split the ensemble into batches of this size.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed; noise is seeded per image and t.")] = 0,
    prompt: Annotated[Optional[str], typer.Option(help="template (\"a photo of a {category}\", default) | captions:FILE | text:STRING | none")] = None,
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
                    prompt, weights, revision, dtype, device, progress, workers, scheduler, resize)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated dataset and the store.")] = Path("demo_out"),
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Benchmark layout: spair, pfpascal, ap10k, davis, hpatches.")] = "spair",
    model: ModelOpt = "tiny-flux",
    baseline: Annotated[Optional[str], typer.Option(help="Also extract this model (e.g. tiny-dinov2, tiny-sd) and compare it with the DiTF row (pair benchmarks).")] = None,
    views: Annotated[bool, typer.Option("--views/--no-views", help="spair: also write the analyze/show PNGs, with a k x t PCK grid.")] = True,
    progress: ProgressOpt = True,
) -> None:
    """Generate a small dataset in a benchmark's real layout and run extract, match and score on a tiny model.

    On pair benchmarks it also prints the ablation table (and a baseline row with --baseline);
    on spair it writes the `ditf analyze` / `ditf show` views.
    """
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.demo import make_demo
    from ditf_pipeline.report import render, render_comparison

    from .pairs_cmds import default_variants, match_options, score_results

    data_root = make_demo(dataset, out / f"{dataset}-demo", overwrite=True)
    typer.echo(f"demo: generated a {dataset}-layout dataset at {data_root}")
    store = out / "ditf.zarr"
    size = {"img_size": 128 if dataset != "davis" else 64, "ensemble_size": 2, "dtype": "fp32", "progress": progress}
    report = extract_options(model, dataset, data_root, None, store, **size)
    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    pairs = get_dataset(dataset, data_root).task == "pairs"  # the ablation table is a PCK comparison
    variants = default_variants(model, dataset, data_root, None, store, [k], [t], every=pairs)
    data, feature_store, k, t, settings = match_options(model, dataset, data_root, None, store, [k], [t], variants,
                                                        progress=progress)
    results = score_results(data, feature_store, model, k, t, settings, None)
    typer.echo("")
    main = next((r for r, s in zip(results, settings) if s.variant == "adaln+cd"), results[0])
    typer.echo(render(main, "table").rstrip())
    note = "(random tiny weights: the numbers show the pipeline works, not what DiTF reaches)"
    if pairs:
        if baseline:
            extract_options(baseline, dataset, data_root, None, store, **size)
            _, _, bk, bt, bsettings = match_options(baseline, dataset, data_root, None, store, None, None, ["raw"],
                                                    progress=progress)
            results += score_results(data, feature_store, baseline, bk, bt, bsettings, None)
        typer.echo(f"\nablation{' and baseline' if baseline else ''} {note}:")
        typer.echo(render_comparison(results, "table", aggregation=data.primary_aggregation).rstrip())
    if dataset == "spair" and views:
        _demo_views(model, data, data_root, store, k, t, out / "analysis", progress)
    typer.echo(f"\ndemo: store at {store}; rerun any stage with --dataset {dataset} --data-root {data_root} "
               f"--store {store} --model {model}")


def _demo_views(model, data, data_root, store, k, t, views, progress) -> None:
    """The analyze/show PNGs of the README, with a second k and t so the k x t grid has cells."""
    from .analysis_cmds import analyze_options, show_options

    grid_k, grid_t = sorted({k, max(0, k - 1)}), sorted({t, 90})
    extract_options(model, data.name, data_root, None, store, grid_k, grid_t, img_size=128, ensemble_size=2,
                    dtype="fp32", progress=progress)
    analyze_options(model, data.name, data_root, None, store, grid_k, grid_t, out=views, match=True)
    first = data.pairs()[0].pair_id
    show_options([first], model, data.name, data_root, None, store, [k], [t], out=views / "show.png")
    show_options([first], model, data.name, data_root, None, store, [k], [t], dense=True, out=views / "show-dense.png")
    typer.echo(f"demo: analysis views (PNG) in {views}")
