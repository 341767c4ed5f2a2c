"""`ditf demo`: a generated dataset in a benchmark's real layout, through every stage on a tiny model."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from .commands import run_extract, run_match, run_score, stored_variants

__all__ = ["run_demo"]

#: random tiny weights: what the demo's numbers mean
NOTE = "(random tiny weights: the numbers show the pipeline works, not what DiTF reaches)"


def _quote(value) -> str:
    return shlex.quote(str(value))


def run_demo(
    *,
    out: Path,
    dataset: str = "spair",
    model: str = "tiny-flux",
    baseline: str | None = None,
    views: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    note: Callable[[str], None] = print,
) -> None:
    """Generate the dataset, run extract, match and score; `echo` gets the results, `note` the rest.

    The closing hints name options that work with every command they mention: the reading
    commands (score, ablate, show, ...) take the dataset, store and model; extract and run also
    need the demo's extract settings, or they would ask for another configuration of the key.
    """
    from ..datasets import get_dataset
    from ..demo import make_demo
    from ..score.report import render, render_comparison
    from ..store.feature_store import FeatureStore

    data_root = make_demo(dataset, out / f"{dataset}-demo", overwrite=True)
    note(f"demo: generated a {dataset}-layout dataset at {data_root}")
    store = out / "ditf.zarr"
    size = {"img_size": 128 if dataset != "davis" else 64, "ensemble_size": 2, "dtype": "fp32"}
    if dataset == "ade20k":
        return _demo_probe(model, data_root, store, out, progress, echo, note)
    report = run_extract(model=model, dataset=dataset, data_root=data_root, store=store, progress=progress, **size)
    note(report.line())
    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    data = get_dataset(dataset, data_root)
    pairs = data.task == "pairs"  # the ablation table is a PCK comparison
    variants = stored_variants(FeatureStore(store, read_only=True), data, model, k, t, every=pairs)
    on_report = lambda stage: note(stage.line())  # noqa: E731
    settings = run_match(model=model, dataset=data, store=store, k=k, t=t, variants=variants, progress=progress,
                         on_report=on_report).settings
    results = run_score(model=model, dataset=data, store=store, k=k, t=t, settings=settings).results
    main = next((r for r, s in zip(results, settings) if s.variant == "adaln+cd"), results[0])
    echo(render(main, "table").rstrip())
    if pairs:
        if baseline:
            note(run_extract(model=baseline, dataset=dataset, data_root=data_root, store=store, progress=progress,
                             **size).line())
            matched = run_match(model=baseline, dataset=data, store=store, variants=["raw"], progress=progress,
                                on_report=on_report)
            results += run_score(model=baseline, dataset=data, store=store, k=matched.k, t=matched.t,
                                 settings=matched.settings).results
        echo(f"\nablation{' and baseline' if baseline else ''} {NOTE}:")
        echo(render_comparison(results, "table", aggregation=data.primary_aggregation).rstrip())
    if dataset == "spair" and views:
        _demo_views(model, data, data_root, store, k, t, out / "analysis", progress, note)
    common = f"--dataset {dataset} --data-root {_quote(data_root)} --store {_quote(store)} --model {model}"
    echo(f"\ndemo: store at {store}; rerun any stage with {common}")
    echo(f"demo: `ditf extract` and `ditf run` also take the demo's extract settings: {common} "
         f"--k {k} --t {t} --img-size {size['img_size']} --ensemble-size {size['ensemble_size']} --dtype {size['dtype']}")


def _demo_probe(model: str, data_root: Path, store: Path, out: Path, progress: bool, echo, note) -> None:
    """ADE20K has no match stage: extract both splits, then train and score the linear probe."""
    from ..probe import ProbeSettings
    from ..store.feature_store import FeatureStore
    from .probe import probe_table, run_probe

    for split in ("training", "validation"):
        report = run_extract(model=model, dataset="ade20k", data_root=data_root, split=split, store=store,
                             img_size=128, ensemble_size=1, dtype="fp32", progress=progress)
        note(report.line())
    k, t = (int(part[1:]) for part in report.keys[0].split("/")[-2:])
    has_adaln = "scale" in FeatureStore(store, read_only=True).open_features("ade20k", model, k, t).modulation_names
    settings = ProbeSettings(variant="adaln" if has_adaln else "raw", epochs=4, lr=0.05, batch_size=4, warmup_steps=0,
                             train_label_side=48)
    result = run_probe(model=model, dataset="ade20k", data_root=data_root, stores=[store], k=k, t=t,
                       settings=settings, out=out / "probe", resume=False, device="cpu", progress=progress).report
    echo(probe_table(result) + f"\n{NOTE}")
    echo(f"\ndemo: store at {store}, probe head in {result.out_dir}; rerun with `ditf probe --dataset ade20k "
         f"--data-root {_quote(data_root)} --store {_quote(store)} --model {model} --variant {settings.variant}`")


def _demo_views(model, data, data_root, store, k, t, views, progress, note) -> None:
    """The analyze/show figures of the docs (docs/explore.md), with a second k and t so the k x t grid has cells."""
    from .views import run_analyze, run_show

    grid_k, grid_t = sorted({k, max(0, k - 1)}), sorted({t, 90})
    note(run_extract(model=model, dataset=data.name, data_root=data_root, store=store, k=grid_k, t=grid_t,
                     img_size=128, ensemble_size=2, dtype="fp32", progress=progress).line())
    # the demo's own store: its massive channels are recorded, as `ditf analyze --write` would
    run_analyze(model=model, dataset=data.name, data_root=data_root, store=store, k=grid_k, t=grid_t, out=views,
                match=True, write=True)
    first = data.pairs()[0].pair_id
    run_show(pairs=[first], model=model, dataset=data.name, data_root=data_root, store=store, k=[k], t=[t],
             out=views / "show.png")
    run_show(pairs=[first], model=model, dataset=data.name, data_root=data_root, store=store, k=[k], t=[t],
             dense=True, out=views / "show-dense.png")
    note(f"demo: analysis views in {views}")
