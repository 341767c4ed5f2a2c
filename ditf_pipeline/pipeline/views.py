"""`ditf analyze` (massive activations, from the cache) and `ditf show` (correspondences as figures)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .commands import DEFAULT_STORE, check_key

__all__ = ["AnalyzeRun", "ShowRun", "check_figure", "run_analyze", "run_show", "selected_keys"]


@dataclass
class AnalyzeRun:
    """What `run_analyze` found: the JSON report, one table per key (and the PCK grid line), the files written."""

    report: dict
    tables: list[str]
    written: list[str]


@dataclass
class ShowRun:
    """The figure `run_show` wrote and, for predictions, each pair's correct keypoints."""

    path: Path
    summary: str | None


def check_figure(fmt: str, dpi: int) -> None:
    from ..core.errors import DitfError
    from ..analysis.plots import FORMATS

    if fmt not in FORMATS:
        raise DitfError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 10 <= dpi <= 1200:
        raise DitfError(f"--dpi must be between 10 and 1200, got {dpi}")


def selected_keys(feature_store, dataset: str, model: str, k, t) -> list[tuple[int, int]]:
    """Every stored key within the --k/--t given; with neither, the one `select_key` picks."""
    from ..core.errors import DitfError
    from ..selection import select_key

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


def load_image(path) -> "object":
    import numpy as np

    from ..core.images import load_rgb

    return np.asarray(load_rgb(path))


def run_analyze(
    *, model: str, dataset: str, data_root: Path | None = None, split: str | None = None,
    store: str | Path = DEFAULT_STORE, k: Sequence[int] | None = None, t: Sequence[int] | None = None,
    sample: int = 32, ratio: float = 100.0, write: bool = False, plots: bool = True, pca_images: int = 4,
    variant: str = "adaln+cd", protocol: str = "dift", alpha: float = 0.1, aggregation: str = "per_point",
    match: bool = False, out: Path = Path("analysis"), progress: bool = False, figure_format: str = "png",
    dpi: int = 100,
) -> AnalyzeRun:
    """`ditf analyze`: massive activations per key, figures and a JSON report in `out`.

    Read-only unless asked: the detected set becomes the key's `massive_channels` (what
    `--channels auto` reads) only with `write`, and `match` computes missing grid predictions;
    otherwise the store is left byte-identical, so exploring another `ratio` changes nothing for
    others sharing the store.
    """
    import numpy as np

    from ..analysis import analyze as an
    from ..analysis import plots as pl
    from ..datasets import get_dataset
    from ..core.errors import DitfError
    from ..store.feature_store import FeatureStore, store_exists

    check_figure(figure_format, dpi)
    ext = f".{figure_format}"
    if aggregation not in ("per_point", "per_image"):
        raise DitfError(f"--aggregation must be per_point or per_image, got {aggregation!r}")
    if sample < 0 or pca_images < 0:
        raise DitfError("--sample and --pca-images must be >= 0")
    from ..validate import check_alphas, check_output_folder, check_protocol, check_variants

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
    keys = selected_keys(feature_store, data.name, model, k, t)
    paths = {record.key: record.path for record in data.images()}
    prefix = f"{data.name}-{model}"
    written: list[str] = []
    summaries = []
    tables: list[str] = []
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
                    images = [load_image(paths[row_keys[row]]) for row in shown]
                    written.append(str(pl.plot_pca(f"{stem}-pca{ext}", images, maps,
                                                   [row_keys[row] for row in shown], title, dpi=dpi)))
        summaries.append(summary)
        tables.append(an.render_key_table(summary))

    grid_name = f"{variant}/{protocol}"
    if match:
        from ..match.predict import MatchSettings, predict

        for kk, tt in keys:
            predict(feature_store, data, model, kk, tt, MatchSettings(variant=variant, protocol=protocol), progress=progress)
    cells = an.pck_grid(feature_store, data, model, keys, grid_name, alpha, aggregation)
    scored = [c for c in cells if c["pck"] is not None]
    if len(keys) > 1:
        tables.append(f"PCK@{alpha:g} ({aggregation}) of {grid_name}: " + ", ".join(
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
    return AnalyzeRun(report, tables, written + [str(json_path)])



def run_show(
    *, pairs: Sequence[str] | None, model: str, dataset: str, data_root: Path | None = None, split: str | None = None,
    store: str | Path = DEFAULT_STORE, k: Sequence[int] | None = None, t: Sequence[int] | None = None,
    variant: str = "adaln+cd", protocol: str = "dift", channels: str = "auto", alpha: float = 0.1,
    dense: bool = False, grid: int = 12, out: Path = Path("show.png"), figure_format: str | None = None,
    dpi: int = 100,
) -> ShowRun:
    """`ditf show`: draw pairs side by side (predictions against ground truth, or dense matches).

    `figure_format` (png, pdf, svg) replaces the ending of `out`. Returns the figure's path and,
    for predictions, each pair's count of correct keypoints.
    """
    import numpy as np

    from ..analysis import analyze as an
    from ..analysis import plots as pl
    from ..datasets import get_dataset
    from ..core.errors import DitfError
    from ..store.feature_store import FeatureStore

    if figure_format is not None:
        check_figure(figure_format, dpi)
        out = out.with_suffix(f".{figure_format}")
    pair = pairs
    if not pair:
        raise DitfError("pass at least one --pair ID")
    if out.suffix.lower().lstrip(".") not in pl.FORMATS:
        raise DitfError(f"--out must be a .png, .pdf or .svg file, got {out}")
    check_figure(out.suffix.lower().lstrip("."), dpi)
    if grid < 1:
        raise DitfError("--grid must be >= 1")
    from ..validate import check_alphas, check_output_file, check_protocol, check_variants

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
    kk, tt = check_key(feature_store, data, model, k, t, [variant])
    chosen = an.find_pairs(data.pairs(), pair)
    paths = {record.key: record.path for record in data.images()}
    name = f"{variant}/{protocol}"
    views = []
    if dense:
        from ..match.features import USES_CHANNELS, compute_feature
        from ..match.inputs import check_features, resolve_channels

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
            views.append(pl.PairView(load_image(paths[p.src_key]), load_image(paths[p.trg_key]), src, pred,
                                     title=f"{p.pair_id}  {name}  k={kk} t={tt}: nearest neighbours of a {grid}x{grid} grid "
                                           f"over {where}"))
        pl.plot_dense(out, views, dpi=dpi)
    else:
        from ..store.feature_store import prediction_scope

        scope = prediction_scope(data.split, [p.pair_id for p in data.pairs()])
        predictions = feature_store.open_predictions((data.name, model, kk, tt), name, scope=scope).read()
        for p in chosen:
            if p.pair_id not in predictions:
                raise DitfError(f"no prediction for pair {p.pair_id} in {name}: run `ditf match` first")
            pred = predictions[p.pair_id]
            correct = an.keypoint_correct(pred, p, alpha, protocol)
            views.append(pl.PairView(
                load_image(paths[p.src_key]), load_image(paths[p.trg_key]), p.src_kps, pred, p.trg_kps, correct,
                title=f"{p.pair_id}  {name}  k={kk} t={tt}: {int(correct.sum())}/{len(correct)} correct at alpha={alpha:g} "
                      "(o correct, x wrong; dot: ground truth, dashed: alpha x threshold radius)",
                radius=alpha * float(p.threshold_base),
            ))
        pl.plot_pairs(out, views, dpi=dpi)
        return ShowRun(out, "; ".join(f"{v.title.split()[0]} {int(np.sum(v.correct))}/{len(v.correct)}" for v in views))
    return ShowRun(out, None)
