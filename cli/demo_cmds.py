"""`ditf demo`: a generated dataset in a benchmark's real layout, through every stage on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import ModelOpt, ProgressOpt, app, user_errors


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
    from ditf_pipeline.pipeline import run_extract
    from ditf_pipeline.report import render, render_comparison

    from .pairs_cmds import default_variants, match_options, score_results

    data_root = make_demo(dataset, out / f"{dataset}-demo", overwrite=True)
    typer.echo(f"demo: generated a {dataset}-layout dataset at {data_root}")
    store = out / "ditf.zarr"
    size = {"img_size": 128 if dataset != "davis" else 64, "ensemble_size": 2, "dtype": "fp32", "progress": progress}
    report = run_extract(model, dataset, data_root, None, store, **size)
    typer.echo(report.line())
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
            typer.echo(run_extract(baseline, dataset, data_root, None, store, **size).line())
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
    from ditf_pipeline.pipeline import run_extract

    from .analysis_cmds import analyze_options, show_options

    grid_k, grid_t = sorted({k, max(0, k - 1)}), sorted({t, 90})
    typer.echo(run_extract(model, data.name, data_root, None, store, grid_k, grid_t, img_size=128, ensemble_size=2,
                           dtype="fp32", progress=progress).line())
    analyze_options(model, data.name, data_root, None, store, grid_k, grid_t, out=views, match=True)
    first = data.pairs()[0].pair_id
    show_options([first], model, data.name, data_root, None, store, [k], [t], out=views / "show.png")
    show_options([first], model, data.name, data_root, None, store, [k], [t], dense=True, out=views / "show-dense.png")
    typer.echo(f"demo: analysis views (PNG) in {views}")
