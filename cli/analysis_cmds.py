"""`ditf analyze` (massive activations, from the cache) and `ditf show` (correspondences as PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DEFAULT_STORE, DataRootOpt, DatasetOpt, KOpt, ModelOpt, ProgressOpt, SplitOpt, StoreOpt, TOpt, app, user_errors

ProtocolOpt = Annotated[str, typer.Option(help="Matching/scoring protocol: dift or geoaware (show: also geoaware-softN predictions).")]
ChannelsOpt = Annotated[str, typer.Option(help="Channels to discard for +cd variants: auto (stored set or 100x-median rule), none, or e.g. 154,1446.")]
DpiOpt = Annotated[int, typer.Option(help="Resolution of PNG figures (dots per inch; 100 = the documented pixel sizes; 300 for print).")]


def _check_figure(fmt: str, dpi: int) -> None:
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.analysis.plots import FORMATS

    if fmt not in FORMATS:
        raise DitfError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 10 <= dpi <= 1200:
        raise DitfError(f"--dpi must be between 10 and 1200, got {dpi}")


def _selected_keys(feature_store, dataset: str, model: str, k, t) -> list[tuple[int, int]]:
    """Every stored key within the --k/--t given; with neither, the one `select_key` picks."""
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.selection import select_key

    if not k and not t:
        return [select_key(feature_store, dataset, model)]
    stored = [(kk, tt) for _, m, kk, tt in feature_store.feature_keys(dataset) if m == model]
    keys = [(kk, tt) for kk, tt in stored if (not k or kk in k) and (not t or tt in t)]
    if not keys:
        have = ", ".join(f"k{kk}/t{tt}" for kk, tt in stored) or "nothing"
        raise DitfError(
            f"store {feature_store.path} has no features for {dataset}/{model}"
            + (f" at k in {k}" if k else "") + (f" t in {t}" if t else "")
            + f" (it has {have}): run `ditf extract`"
        )
    return keys


def _load_image(path) -> "object":
    import numpy as np

    from ditf_pipeline.core.images import load_rgb

    return np.asarray(load_rgb(path))


@app.command()
@user_errors
def analyze(
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    sample: Annotated[int, typer.Option(help="Images per key for the statistics (the first complete ones; 0 = all).")] = 32,
    ratio: Annotated[float, typer.Option(help="Massive if mean |z| over tokens exceeds this x the median channel.")] = 100.0,
    write: Annotated[Optional[bool], typer.Option("--write/--no-write", help="Store the detected set as the key's massive_channels (read by --channels auto); default: on, off for a published (read-only) store.")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the figures (see --figure-format).")] = True,
    pca_images: Annotated[int, typer.Option(help="Images in the PCA-to-RGB figure.")] = 4,
    variant: Annotated[str, typer.Option("--variant", "-v", help="Predictions scored for the k x t PCK grid.")] = "adaln+cd",
    protocol: ProtocolOpt = "dift",
    alpha: Annotated[float, typer.Option(help="PCK alpha of the k x t grid.")] = 0.1,
    aggregation: Annotated[str, typer.Option(help="per_point or per_image for the grid.")] = "per_point",
    match: Annotated[bool, typer.Option("--match/--no-match", help="Compute missing grid predictions from the cache (channels auto).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and the figures.")] = Path("analysis"),
    fmt: Annotated[str, typer.Option("--format", help="table | json (printed; the JSON file is always written)")] = "table",
    figure_format: Annotated[str, typer.Option("--figure-format", help="png | pdf | svg (pdf and svg: vector, for papers).")] = "png",
    dpi: DpiOpt = 100,
    progress: ProgressOpt = False,
) -> None:
    """Massive activations from the cache (paper Table 1, Figures 4, 5, 12); no DiT runs.

    Per (k, t): channels ranked by mean |activation|, the 100x-median massive channels and their
    AdaLN gate ranks, the same after AdaLN and channel discard; PNG figures and a JSON in --out.
    """
    if write is None:  # a published store cannot take the channels: analyze it without storing them
        from ditf_pipeline.store.feature_store import is_read_only, store_location

        write = not is_read_only(store_location(store))
    analyze_options(model, dataset, data_root, split, store, k, t, sample=sample, ratio=ratio, write=write, plots=plots,
                    pca_images=pca_images, variant=variant, protocol=protocol, alpha=alpha, aggregation=aggregation,
                    match=match, out=out, fmt=fmt, progress=progress, figure_format=figure_format, dpi=dpi)


def analyze_options(
    model: str, dataset: str, data_root: Path, split: str | None, store: str | Path, k: list[int] | None, t: list[int] | None,
    *, sample: int = 32, ratio: float = 100.0, write: bool = True, plots: bool = True, pca_images: int = 4,
    variant: str = "adaln+cd", protocol: str = "dift", alpha: float = 0.1, aggregation: str = "per_point",
    match: bool = False, out: Path = Path("analysis"), fmt: str = "table", progress: bool = False,
    figure_format: str = "png", dpi: int = 100,
) -> dict:
    """`ditf analyze` as a function (for `ditf demo`): prints, writes the files, returns the JSON report."""
    import numpy as np

    from ditf_pipeline.analysis import analyze as an
    from ditf_pipeline.analysis import plots as pl
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.store.feature_store import FeatureStore, store_exists

    if fmt not in ("table", "json"):
        raise DitfError(f"--format must be table or json, got {fmt!r}")
    _check_figure(figure_format, dpi)
    ext = f".{figure_format}"
    if aggregation not in ("per_point", "per_image"):
        raise DitfError(f"--aggregation must be per_point or per_image, got {aggregation!r}")
    if sample < 0 or pca_images < 0:
        raise DitfError("--sample and --pca-images must be >= 0")
    from ditf_pipeline.validate import check_alphas, check_output_folder, check_protocol, check_variants

    check_variants([variant])
    check_protocol(protocol)
    check_alphas([alpha])
    check_output_folder(out)
    if not ratio > 0:
        raise DitfError(f"--ratio must be a positive number, got {ratio}")
    data = get_dataset(dataset, data_root, split)
    if not store_exists(store):
        raise DitfError(f"store {store} does not exist: run `ditf extract` first")
    feature_store = FeatureStore(store, read_only=not (write or match))
    keys = _selected_keys(feature_store, data.name, model, k, t)
    paths = {record.key: record.path for record in data.images()}
    prefix = f"{data.name}-{model}"
    written: list[str] = []
    summaries = []
    for kk, tt in keys:
        arrays = feature_store.open_features(data.name, model, kk, tt)
        result = an.analyze_key(arrays, sample=sample, ratio=ratio, key=(data.name, model, kk, tt))
        summary = result.summary
        if write:
            arrays.set_massive_channels(
                summary["massive_channels"],
                {"ratio": ratio, "n_images": summary["n_images"], "rule": "mean |z| over tokens > ratio x median channel"},
            )
            summary["stored_as"] = f"{arrays.path} attrs massive_channels"
        if plots:
            stem = out / f"{prefix}-k{kk}-t{tt}"
            title = f"{data.name}/{model} k={kk} t={tt} ({summary['n_images']} image(s))"
            written.append(str(pl.plot_magnitudes(f"{stem}-magnitude{ext}", result.example, result.channel_mean,
                                                   summary["massive_channels"], title, dpi=dpi)))
            if result.gate is not None:
                written.append(str(pl.plot_gate(f"{stem}-gate{ext}", result.channel_mean["raw"], result.gate,
                                                summary["massive_channels"], title, dpi=dpi)))
            if pca_images:
                row_keys = {row: key for key, row in feature_store.image_rows(data.name).items()}
                shown = [row for row in result.rows if row_keys.get(row) in paths][:pca_images]
                if shown:
                    features = [an.stage_features(arrays, row, summary["discarded_channels"]) for row in shown]
                    maps = {stage: an.pca_rgb([f[stage] for f in features]) for stage in features[0]}
                    images = [_load_image(paths[row_keys[row]]) for row in shown]
                    written.append(str(pl.plot_pca(f"{stem}-pca{ext}", images, maps,
                                                   [row_keys[row] for row in shown], title, dpi=dpi)))
        summaries.append(summary)
        if fmt == "table":
            typer.echo(an.render_key_table(summary) + "\n")

    grid_name = f"{variant}/{protocol}"
    if match:
        from ditf_pipeline.match.predict import MatchSettings, predict

        for kk, tt in keys:
            predict(feature_store, data, model, kk, tt, MatchSettings(variant=variant, protocol=protocol), progress=progress)
    cells = an.pck_grid(feature_store, data, model, keys, grid_name, alpha, aggregation)
    scored = [c for c in cells if c["pck"] is not None]
    if fmt == "table" and len(keys) > 1:
        typer.echo(f"PCK@{alpha:g} ({aggregation}) of {grid_name}: " + ", ".join(
            f"k{c['k']}/t{c['t']} {c['pck']:.1f}" if c["pck"] is not None else f"k{c['k']}/t{c['t']} -" for c in cells
        ) + ("" if len(scored) == len(cells) else "  (-: no predictions; run `ditf match` or pass --match)"))
    if plots and len(scored) > 1:
        ks, ts = sorted({c["k"] for c in cells}), sorted({c["t"] for c in cells})
        values = np.full((len(ks), len(ts)), np.nan)
        for c in scored:
            values[ks.index(c["k"]), ts.index(c["t"])] = c["pck"]
        written.append(str(pl.plot_pck_grid(out / f"{prefix}-pck-grid{ext}", ks, ts, values,
                                            f"{data.name}/{model} {grid_name}", f"PCK@{alpha:g} ({aggregation}, %)",
                                            dpi=dpi)))
    report = {
        "dataset": data.name, "model": model, "keys": summaries,
        "pck_grid": {"prediction": grid_name, "alpha": alpha, "aggregation": aggregation, "cells": cells},
        "plots": written,
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{prefix}-analysis.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    for path in written:
        typer.echo(f"analyze: wrote {path}")
    typer.echo(f"analyze: wrote {json_path}")
    return report


@app.command()
@user_errors
def show(
    pair: Annotated[Optional[list[str]], typer.Option("--pair", "-p", help="Pair id, its leading number (1 = 000001-...) or a unique prefix; repeat for several.")] = None,
    model: ModelOpt = "flux",
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = Path("data/SPair-71k"),
    split: SplitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    k: KOpt = None,
    t: TOpt = None,
    variant: Annotated[str, typer.Option("--variant", "-v", help="Feature variant whose predictions (or, with --dense, features) are shown.")] = "adaln+cd",
    protocol: ProtocolOpt = "dift",
    channels: ChannelsOpt = "auto",
    alpha: Annotated[float, typer.Option(help="Threshold for correct (circle) vs wrong (cross).")] = 0.1,
    dense: Annotated[bool, typer.Option("--dense", help="Show nearest-neighbour matches of a grid of source points (over the source box when annotated) instead, from cached features.")] = False,
    grid: Annotated[int, typer.Option(help="--dense: grid of N x N source points.")] = 12,
    out: Annotated[Path, typer.Option(help="Figure file to write (.png, .pdf or .svg).")] = Path("show.png"),
    figure_format: Annotated[Optional[str], typer.Option("--format", "--figure-format", help="png | pdf | svg: replaces the ending of --out (default: --out's ending).")] = None,
    dpi: DpiOpt = 100,
) -> None:
    """Draw pairs side by side: predicted vs ground-truth keypoints, with the alpha x bbox radius
    around each ground truth (or --dense matches), as PNG, PDF or SVG."""
    if figure_format is not None:
        _check_figure(figure_format, dpi)
        out = out.with_suffix(f".{figure_format}")
    show_options(pair, model, dataset, data_root, split, store, k, t, variant=variant, protocol=protocol,
                 channels=channels, alpha=alpha, dense=dense, grid=grid, out=out, dpi=dpi)


def show_options(
    pair: list[str] | None, model: str, dataset: str, data_root: Path, split: str | None, store: str | Path,
    k: list[int] | None, t: list[int] | None, *, variant: str = "adaln+cd", protocol: str = "dift",
    channels: str = "auto", alpha: float = 0.1, dense: bool = False, grid: int = 12, out: Path = Path("show.png"),
    dpi: int = 100,
) -> Path:
    """`ditf show` as a function (for `ditf demo`): writes the figure and returns its path."""
    import numpy as np

    from ditf_pipeline.analysis import analyze as an
    from ditf_pipeline.analysis import plots as pl
    from ditf_pipeline.datasets import get_dataset
    from ditf_pipeline.core.errors import DitfError
    from ditf_pipeline.store.feature_store import FeatureStore

    if not pair:
        raise DitfError("pass at least one --pair ID")
    if out.suffix.lower().lstrip(".") not in pl.FORMATS:
        raise DitfError(f"--out must be a .png, .pdf or .svg file, got {out}")
    _check_figure(out.suffix.lower().lstrip("."), dpi)
    if grid < 1:
        raise DitfError("--grid must be >= 1")
    from ditf_pipeline.validate import check_alphas, check_output_file, check_protocol, check_variants

    check_variants([variant])
    check_protocol(protocol)
    check_alphas([alpha])
    check_output_file(out)  # its ending was checked above (png, pdf or svg)
    data = get_dataset(dataset, data_root, split)
    if data.task != "pairs":
        raise DitfError(f"dataset {data.name} is a {data.task} benchmark, not keypoint pairs")
    feature_store = FeatureStore(store, read_only=True)
    if len(k or []) > 1 or len(t or []) > 1:
        raise DitfError("show takes one --k and one --t")
    from ditf_pipeline.pipeline import check_key

    kk, tt = check_key(feature_store, data, model, k, t, [variant])
    chosen = an.find_pairs(data.pairs(), pair)
    paths = {record.key: record.path for record in data.images()}
    name = f"{variant}/{protocol}"
    views = []
    if dense:
        from ditf_pipeline.match.features import USES_CHANNELS, compute_feature
        from ditf_pipeline.match.predict import check_features, resolve_channels

        arrays = feature_store.open_features(data.name, model, kk, tt)
        rows = feature_store.image_rows(data.name)
        check_features(chosen, rows, arrays)
        discard = resolve_channels(channels, arrays) if variant in USES_CHANNELS else []

        def feature(key):
            z, modulation = arrays.read_image(rows[key])
            return compute_feature(variant, z, modulation, discard)

        for p in chosen:
            box = p.extra.get("src_bndbox")
            src, pred = an.dense_matches(feature(p.src_key), p.src_size, feature(p.trg_key), p.trg_size, protocol,
                                         n=grid, box=box)
            where = "the source box" if box is not None else "the source image"
            views.append(pl.PairView(_load_image(paths[p.src_key]), _load_image(paths[p.trg_key]), src, pred,
                                     title=f"{p.pair_id}  {name}  k={kk} t={tt}: nearest neighbours of a {grid}x{grid} grid "
                                           f"over {where}"))
        pl.plot_dense(out, views, dpi=dpi)
    else:
        from ditf_pipeline.store.feature_store import prediction_scope

        scope = prediction_scope(data.split, [p.pair_id for p in data.pairs()])
        predictions = feature_store.open_predictions((data.name, model, kk, tt), name, scope=scope).read()
        for p in chosen:
            if p.pair_id not in predictions:
                raise DitfError(f"no prediction for pair {p.pair_id} in {name}: run `ditf match` first")
            pred = predictions[p.pair_id]
            correct = an.keypoint_correct(pred, p, alpha, protocol)
            views.append(pl.PairView(
                _load_image(paths[p.src_key]), _load_image(paths[p.trg_key]), p.src_kps, pred, p.trg_kps, correct,
                title=f"{p.pair_id}  {name}  k={kk} t={tt}: {int(correct.sum())}/{len(correct)} correct at alpha={alpha:g} "
                      "(o correct, x wrong; dot: ground truth, dashed: alpha x threshold radius)",
                radius=alpha * float(p.threshold_base),
            ))
        pl.plot_pairs(out, views, dpi=dpi)
        typer.echo("show: " + "; ".join(f"{v.title.split()[0]} {int(np.sum(v.correct))}/{len(v.correct)}" for v in views))
    typer.echo(f"show: wrote {out}")
    return out
