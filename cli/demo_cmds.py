"""`ditf demo`: a generated dataset in a benchmark's real layout, through every stage on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import ModelOpt, ProgressOpt, QuietOpt, app, user_errors


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated dataset and the store.")] = Path("demo_out"),
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Benchmark layout: spair, pfpascal, ap10k, davis, hpatches, ade20k (linear probe).")] = "spair",
    model: ModelOpt = "tiny-flux",
    baseline: Annotated[Optional[str], typer.Option(help="Also extract this model (e.g. tiny-dinov2, tiny-sd) and compare it with the DiTF row (pair benchmarks).")] = None,
    views: Annotated[bool, typer.Option("--views/--no-views", help="spair: also write the analyze/show PNGs, with a k x t PCK grid.")] = True,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
) -> None:
    """Generate a small dataset in a benchmark's real layout and run extract, match and score on a tiny model.

    On pair benchmarks it also prints the ablation table (and a baseline row with --baseline);
    on spair it writes the `ditf analyze` / `ditf show` views; on ade20k it extracts both splits
    and trains and scores the linear probe (`ditf probe`).
    """
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.demo import make_demo
    from ditf_pipeline.pipeline import run_extract, run_match, run_score, stored_variants
    from ditf_pipeline.score.report import render, render_comparison
    from ditf_pipeline.store.feature_store import FeatureStore

    progress = progress and not quiet
    data_root = make_demo(dataset, out / f"{dataset}-demo", overwrite=True)
    typer.echo(f"demo: generated a {dataset}-layout dataset at {data_root}")
    store = out / "ditf.zarr"
    size = {"img_size": 128 if dataset != "davis" else 64, "ensemble_size": 2, "dtype": "fp32", "progress": progress}
    if dataset == "ade20k":
        return _demo_probe(model, data_root, store, out, progress)
    report = run_extract(model, dataset, data_root, None, store, **size)
    typer.echo(report.line())
    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    data = get_dataset(dataset, data_root)
    pairs = data.task == "pairs"  # the ablation table is a PCK comparison
    variants = stored_variants(FeatureStore(store, read_only=True), data, model, k, t, every=pairs)
    echo = lambda report: typer.echo(report.line())  # noqa: E731
    settings = run_match(model, data, store=store, k=[k], t=[t], variants=variants, progress=progress,
                         on_report=echo).settings
    results = run_score(model, data, store=store, k=[k], t=[t], settings=settings).results
    typer.echo("")
    main = next((r for r, s in zip(results, settings) if s.variant == "adaln+cd"), results[0])
    typer.echo(render(main, "table").rstrip())
    note = "(random tiny weights: the numbers show the pipeline works, not what DiTF reaches)"
    if pairs:
        if baseline:
            typer.echo(run_extract(baseline, dataset, data_root, None, store, **size).line())
            matched = run_match(baseline, data, store=store, variants=["raw"], progress=progress, on_report=echo)
            results += run_score(baseline, data, store=store, k=[matched.k], t=[matched.t],
                                 settings=matched.settings).results
        typer.echo(f"\nablation{' and baseline' if baseline else ''} {note}:")
        typer.echo(render_comparison(results, "table", aggregation=data.primary_aggregation).rstrip())
    if dataset == "spair" and views:
        _demo_views(model, data, data_root, store, k, t, out / "analysis", progress)
    typer.echo(f"\ndemo: store at {store}; rerun any stage with --dataset {dataset} --data-root {data_root} "
               f"--store {store} --model {model}")


def _demo_probe(model: str, data_root: Path, store: Path, out: Path, progress: bool) -> None:
    """ADE20K has no match stage: extract both splits, then train and score the linear probe."""
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.pipeline import run_extract
    from ditf_pipeline.analysis.probe import ProbeSettings, run_probe
    from ditf_pipeline.store.feature_store import FeatureStore

    from .probe_cmds import _table

    for split in ("training", "validation"):
        report = run_extract(model, "ade20k", data_root, split, store, img_size=128, ensemble_size=1, dtype="fp32",
                             progress=progress)
        typer.echo(report.line())
    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    feature_store = FeatureStore(store, read_only=True)
    has_adaln = "scale" in feature_store.open_features("ade20k", model, k, t).modulation_names
    settings = ProbeSettings(variant="adaln" if has_adaln else "raw", epochs=4, lr=0.05, batch_size=4, warmup_steps=0,
                             train_label_side=48)
    result = run_probe([feature_store], get_dataset("ade20k", data_root, "training"),
                       get_dataset("ade20k", data_root, "validation"), model, k, t, settings,
                       out_dir=out / "probe", resume=False, device="cpu", progress=progress)
    typer.echo("")
    typer.echo(_table(result) + "\n(random tiny weights: the numbers show the pipeline works, not what DiTF reaches)")
    typer.echo(f"\ndemo: store at {store}, probe head in {result.out_dir}; rerun with `ditf probe --dataset ade20k "
               f"--data-root {data_root} --store {store} --model {model} --variant {settings.variant}`")


def _demo_views(model, data, data_root, store, k, t, views, progress) -> None:
    """The analyze/show PNGs of the docs (docs/explore.md), with a second k and t so the k x t grid has cells."""
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
